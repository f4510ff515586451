"""The Config tab: a form generated from the schema over a tomlkit document, live CLI validation, the estimate."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from finetune.errors import FinetuneError
from finetune.studio import config_form as cf
from finetune.studio import runs
from finetune.studio.estimate import CARD_SIZES_GIB, preflight
from finetune.studio.paths import PathRefused, Workspace

FIELDS_PER_ROW = 3


def elem_id(spec: cf.FieldSpec, prefix: str = "cfg") -> str:
    return f"{prefix}-" + spec.dotted.replace(".", "-")


def _component(spec: cf.FieldSpec):
    label = spec.path[-1] + (" (required)" if spec.required else "")
    common = {"label": label, "info": spec.description or None, "elem_id": elem_id(spec)}
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(spec.default), **common)
    if spec.kind == "choice":
        return gr.Dropdown(list(spec.choices), value=spec.default, **common)
    shown = cf.shown_value(spec, spec.default) if spec.default not in (None, "") else ""
    placeholder = f"default: {shown}" if shown != "" else ("required" if spec.required else "unset")
    return gr.Textbox(value="", placeholder=placeholder, max_lines=1, **common)


def build(workspace: Workspace) -> None:
    specs = cf.form_fields()
    doc_state = gr.State("")  # the document as TOML text: cheap to keep per tab, re-parsed per edit
    path_state = gr.State("")  # where the document came from / is saved to (absolute)
    with gr.Row():
        path_box = gr.Textbox(label="config file (inside the workspace)", elem_id="cfg-path", scale=3,
                              placeholder="train.toml")
        open_btn = gr.Button("Open", elem_id="cfg-open", scale=1)
        run_pick = gr.Dropdown([], label="or load from a run (its config.resolved.toml)", elem_id="cfg-run",
                               scale=3, allow_custom_value=True)
        run_btn = gr.Button("Load from run", elem_id="cfg-load-run", scale=1)
    with gr.Row():
        save_box = gr.Textbox(label="save as (default: the opened file)", elem_id="cfg-save-path", scale=3)
        save_btn = gr.Button("Save", variant="primary", elem_id="cfg-save", scale=1)
        card = gr.Radio([str(c) for c in CARD_SIZES_GIB], value="24", label="card size (GiB)", elem_id="cfg-card",
                        scale=2)
    status = gr.Markdown(elem_id="cfg-status")
    estimate = gr.Markdown(elem_id="cfg-estimate")
    general = gr.Markdown(elem_id="cfg-errors")
    components, errors = [], []
    for name, group in cf.sections(specs).items():
        with gr.Accordion(f"[{name}]", open=name in ("model", "dataset", "dataset.subsets", "training")):
            for start in range(0, len(group), FIELDS_PER_ROW):
                with gr.Row(equal_height=False):
                    for spec in group[start:start + FIELDS_PER_ROW]:
                        with gr.Column(min_width=240):
                            components.append(_component(spec))
                            errors.append(gr.Markdown(visible=False, elem_id=elem_id(spec, "err"),
                                                      elem_classes=["field-error"]))

    def checked(doc_text, path_text, card_value):
        """Error updates for every field, all messages, and the estimate."""
        if not path_text:
            return [gr.update(visible=False)] * len(errors) + ["", ""]
        doc = cf.parse_document(doc_text)
        cfg, by_key, messages = cf.validate(doc, Path(path_text), workspace)
        updates = [gr.update(value=f"⚠ {by_key[s.dotted]}", visible=True) if s.dotted in by_key
                   else gr.update(value="", visible=False) for s in specs]
        listing = "\n".join(f"- {m}" for m in messages) if messages else "config is valid"
        shown = preflight(cfg, float(card_value)) if cfg is not None else "estimate: fix the config first"
        return updates + [listing, shown]

    def load(text: str):
        doc = cf.parse_document(text)
        return [cf.shown_value(s, cf.get_value(doc, s.path)) for s in specs], text

    def on_open(text, card_value):
        try:
            path = workspace.resolve(text, "config")
            if path.suffix != ".toml" or path.is_dir():
                raise PathRefused(f"config: {text} is not a .toml file")
            # A new file starts empty; nothing is written until Save.
            body = path.read_text(encoding="utf-8") if path.exists() else ""
            cf.parse_document(body)
        except (FinetuneError, OSError, ValueError) as err:
            # The form and its unsaved edits stay as they were: only the message changes.
            return [gr.update()] * len(specs) + [gr.update(), gr.update(), f"**cannot open**: {err}", gr.update()] + \
                [gr.update()] * (len(errors) + 2)
        values, body = load(body)
        opened = "opened" if path.exists() else "new file (saved on Save):"
        return values + [body, str(path), f"{opened} {workspace.relative(path)}", workspace.relative(path)] + \
            checked(body, str(path), card_value)

    outputs = components + [doc_state, path_state, status, save_box] + errors + [general, estimate]
    open_btn.click(on_open, [path_box, card], outputs)
    path_box.submit(on_open, [path_box, card], outputs)

    def on_run(folder_text, card_value):
        try:
            folder = workspace.existing(folder_text, "run folder")
            path = runs.resume_config(folder)
            body = path.read_text(encoding="utf-8")
        except (FinetuneError, OSError) as err:
            return [gr.update()] * len(specs) + [gr.update(), gr.update(), f"**cannot load**: {err}", gr.update()] + \
                [gr.update()] * (len(errors) + 2)
        values, body = load(body)
        # Saved elsewhere by default: the run's own resolved config is its record, not a draft.
        suggestion = workspace.relative(folder.parent / f"{folder.name}-next.toml")
        return values + [body, str(path), f"loaded {workspace.relative(path)}", suggestion] + \
            checked(body, str(path), card_value)

    run_btn.click(on_run, [run_pick, card], outputs)
    run_pick.focus(lambda: gr.update(choices=[workspace.relative(p) for p in runs.list_runs(workspace)]), None,
                   run_pick)

    def make_handler(spec: cf.FieldSpec):
        def on_edit(value, doc_text, path_text, card_value):
            doc = cf.parse_document(doc_text)
            written, _ = cf.field_value(spec, value)
            cf.set_value(doc, spec.path, written)
            body = doc.as_string()
            return [body] + checked(body, path_text, card_value)
        return on_edit

    check_outputs = [doc_state] + errors + [general, estimate]
    for spec, component in zip(specs, components):
        handler = make_handler(spec)
        inputs = [component, doc_state, path_state, card]
        if isinstance(component, gr.Textbox):
            component.blur(handler, inputs, check_outputs)
            component.submit(handler, inputs, check_outputs)
        else:
            component.input(handler, inputs, check_outputs)
    card.input(lambda d, p, c: checked(d, p, c), [doc_state, path_state, card], errors + [general, estimate])

    def on_save(doc_text, path_text, save_text):
        try:
            target = workspace.resolve(save_text or path_text, "save as")
            if target.suffix != ".toml":
                return f"**not saved**: {target.name} is not a .toml file", path_text
            if target.name == runs.RESOLVED_CONFIG:
                return (f"**not saved**: {workspace.relative(target)} is a run's record of what it trained with; "
                        "save as another file"), path_text
            cf.save_document(cf.parse_document(doc_text), target)
        except (FinetuneError, OSError) as err:
            return f"**not saved**: {err}", path_text
        moved = path_text and Path(path_text).parent != target.parent
        note = (f"; its relative paths now resolve against {workspace.relative(target.parent)}/, check them"
                if moved else "")
        return f"saved {workspace.relative(target)}{note}", str(target)

    save_btn.click(on_save, [doc_state, path_state, save_box], [status, path_state])
