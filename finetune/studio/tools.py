"""The Tools tab: merge, convert, resize, extract, sample and caption, each calling the function its CLI command calls.

Inputs must exist inside the workspace and outputs must not exist yet: a tool never replaces a file.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from finetune.errors import FinetuneError
from finetune.studio.paths import PathRefused, Workspace

# Each tool (torch, diffusers) is imported when it runs, so the studio answers before they load
# (app.warm_up imports them in the background once it does).


def parse_loras(workspace: Workspace, text: str, required: bool = True) -> list[tuple[Path, float]]:
    """One LoRA per line, `path` or `path:weight` (as `finetune merge --lora FILE[:SCALE]`)."""
    loras = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        head, sep, tail = line.rpartition(":")
        weight = 1.0
        if sep and head:
            try:
                weight = float(tail)
                line = head
            except ValueError:
                pass
        loras.append((workspace.existing(line, f"LoRA on line {number}"), weight))
    if not loras and required:
        raise PathRefused("LoRAs: give at least one, one per line as path or path:weight")
    return loras


def run_merge(workspace: Workspace, base: str, loras: str, dtype: str, out: str) -> str:
    from finetune.dtypes import DTYPES
    from finetune.tools.merge import merge_loras

    base_path, pairs = workspace.existing(base, "base model"), parse_loras(workspace, loras)
    target = workspace.new_output(out, "merged model")
    report = merge_loras(base_path, pairs, target, dtype=DTYPES[dtype] if dtype != "keep" else None)
    return f"{report}\n\noutput: {workspace.relative(target)}"


def run_convert(workspace: Workspace, lora: str, to: str, out: str) -> str:
    from finetune.adapters.convert import convert_lora

    target = workspace.new_output(out, "converted LoRA")
    return f"written {workspace.relative(convert_lora(workspace.existing(lora, 'LoRA'), target, to=to))}"


def run_resize(workspace: Workspace, lora: str, rank: float, energy: float, out: str) -> str:
    from finetune.tools.resize import resize_lora

    target = workspace.new_output(out, "resized LoRA")
    report = resize_lora(workspace.existing(lora, "LoRA"), target, int(rank), energy=energy or None)
    return f"{report}\n\noutput: {workspace.relative(target)}"


def run_extract(workspace: Workspace, base: str, tuned: str, rank: float, out: str) -> str:
    from finetune.tools.extract import extract_lora

    target = workspace.new_output(out, "extracted LoRA")
    report = extract_lora(workspace.existing(base, "base model"), workspace.existing(tuned, "tuned model"),
                          int(rank), target)
    return f"{report}\n\noutput: {workspace.relative(target)}"


def run_sample(workspace: Workspace, model: str, loras: str, prompt: str, negative: str, seed: float, steps: float,
               height: float, width: float, out: str) -> tuple[str, str | None]:
    from finetune.tools.sample import render_from_model

    target = workspace.new_output(out, "sample image")
    path = render_from_model(workspace.existing(model, "model"), prompt, target, seed=int(seed), steps=int(steps),
                             height=int(height), width=int(width), negative_prompt=negative,
                             loras=parse_loras(workspace, loras, required=False), progress=False)
    return f"written {workspace.relative(path)}", str(path)


def run_caption(workspace: Workspace, folder: str, model: str, caption_ext: str) -> str:
    from finetune.tools.caption import caption_folder, format_stats

    # Never overwrite: only images without a caption file get one (the studio replaces no user file).
    stats = caption_folder(workspace.existing(folder, "image folder"), workspace.existing(model, "caption model"),
                           overwrite=False, caption_ext=caption_ext)
    return format_stats(stats)


def _guarded(fn, outputs: int = 1):
    """Run a tool; a toolkit error becomes the message shown (as the CLI prints it), other outputs empty."""
    def call(*args, progress=gr.Progress(track_tqdm=True)):
        try:
            return fn(*args)
        except FinetuneError as err:
            return f"**error**: {err}" if outputs == 1 else (f"**error**: {err}", *[None] * (outputs - 1))
    return call


def _tab(workspace: Workspace, title: str, run, fields, *, button: str | None = None,
         out: str | None = "output (must not exist)", image: bool = False) -> None:
    """One tool's tab: `fields()` builds its inputs, then the output path (`out`, its label), the button
    and the result (and the rendered `image`); the button calls `run(workspace, *inputs, out)`."""
    key = title.lower()
    with gr.Tab(title, id=f"tool-{key}"):
        inputs = fields()
        if out is not None:
            inputs.append(gr.Textbox(label=out, elem_id=f"{key}-out"))
        outputs = [gr.Markdown(elem_id=f"{key}-result")]
        if image:
            outputs.append(gr.Image(label="sample", elem_id=f"{key}-image", type="filepath"))
        gr.Button(button or title, variant="primary", elem_id=f"{key}-run").click(
            _guarded(lambda *a: run(workspace, *a), len(outputs)), inputs, outputs)


def _sample_fields() -> list:
    fields = [gr.Textbox(label="model (diffusers folder or single .safetensors)", elem_id="sample-model"),
              gr.Textbox(label="LoRAs applied unmerged, one per line: path or path:weight (optional)", lines=2,
                         elem_id="sample-loras"),
              gr.Textbox(label="prompt", elem_id="sample-prompt"),
              gr.Textbox(label="negative prompt", elem_id="sample-negative")]
    with gr.Row():
        fields += [gr.Number(0, label="seed", precision=0), gr.Number(20, label="steps", precision=0, minimum=1),
                   gr.Number(1024, label="height", precision=0, minimum=64, step=64),
                   gr.Number(1024, label="width", precision=0, minimum=64, step=64)]
    return fields


def build(workspace: Workspace) -> None:
    _tab(workspace, "Merge", run_merge, lambda: [
        gr.Textbox(label="base model (diffusers folder or single .safetensors)", elem_id="merge-base"),
        gr.Textbox(label="LoRAs, one per line: path or path:weight", lines=3, elem_id="merge-loras"),
        gr.Dropdown(["keep", "fp16", "bf16", "fp32"], value="keep", label="dtype", elem_id="merge-dtype")])
    _tab(workspace, "Convert", run_convert, lambda: [
        gr.Textbox(label="LoRA", elem_id="convert-lora"),
        gr.Radio(["kohya", "diffusers"], value="diffusers", label="to", elem_id="convert-to")])
    _tab(workspace, "Resize", run_resize, lambda: [
        gr.Textbox(label="LoRA", elem_id="resize-lora"),
        gr.Number(8, label="new rank (at most, per module)", precision=0, minimum=1, elem_id="resize-rank"),
        gr.Number(0, label="energy (e.g. 0.95; 0 = off)", minimum=0, maximum=1, elem_id="resize-energy")])
    _tab(workspace, "Extract", run_extract, lambda: [
        gr.Textbox(label="base model", elem_id="extract-base"),
        gr.Textbox(label="fine-tuned model", elem_id="extract-tuned"),
        gr.Number(16, label="rank", precision=0, minimum=1, elem_id="extract-rank")])
    _tab(workspace, "Sample", run_sample, _sample_fields, button="Render", out="output PNG (must not exist)",
         image=True)
    _tab(workspace, "Caption", run_caption, lambda: [
        gr.Textbox(label="image folder (images without a caption file get one)", elem_id="caption-folder"),
        gr.Textbox(label="local image-to-text model folder", elem_id="caption-model"),
        gr.Radio([".txt", ".caption"], value=".txt", label="caption extension", elem_id="caption-ext")], out=None)
