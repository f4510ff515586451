"""The Dataset tab: bucket chart and table, filtered thumbnail grid with crops drawn, problems, caption editing."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from finetune.errors import FinetuneError
from finetune.studio import dataset as ds
from finetune.studio.paths import Workspace


def _chart_frame(view: ds.DatasetView | None):
    # Labels that sort as the plan does, portrait to landscape: the aspect ratio first ("0.25 256x64").
    # Before a dataset is open, one placeholder row: the chart sizes its label column from its first
    # data, and an empty first frame leaves every later label cut to a few characters.
    rows = ([[f"{aspect:.2f} {label}", aspect, count] for label, aspect, count in view.bucket_table()] if view
            else [["(no dataset open)", 0.0, 0]])
    frame = pd.DataFrame(rows, columns=["bucket", "aspect", "images"])
    return frame.astype({"images": float})  # a quantity axis (integers would be drawn as categories)


def build(workspace: Workspace) -> None:
    view_state = gr.State(None)  # the DatasetView of this tab
    picked_state = gr.State([])  # row indices passing the filters
    selected_state = gr.State(None)  # row index being edited
    loaded_state = gr.State("")  # its caption as loaded: a different text in the box is an unsaved edit
    with gr.Row():
        source = gr.Textbox(label="config (.toml) or image folder, inside the workspace", elem_id="ds-source",
                            placeholder="train.toml or images/", scale=4)
        open_btn = gr.Button("Open", variant="primary", elem_id="ds-open", scale=1)
    status = gr.Markdown(elem_id="ds-status")
    with gr.Row():
        # Bars across: SDXL plans ~37 buckets, whose labels stay readable down the side, not under the bars.
        chart = gr.BarPlot(_chart_frame(None), x="images", y="bucket", title="images per bucket: aspect (w/h), h x w",
                           elem_id="ds-chart", scale=3, height=440)
        table = gr.Dataframe(headers=["bucket", "aspect", "images"], interactive=False, elem_id="ds-buckets",
                             label="bucket plan", scale=2, max_height=300)
    with gr.Row():
        bucket = gr.Dropdown([ds.ALL], value=ds.ALL, label="bucket", elem_id="ds-bucket")
        cropped = gr.Slider(0, 95, value=0, step=5, label="cropped more than (%)", elem_id="ds-cropped")
        kind = gr.Dropdown([ds.ALL, ds.ANY_NOTE], value=ds.ALL, label="problem", elem_id="ds-kind")
        page = gr.Number(1, label="page", precision=0, minimum=1, elem_id="ds-page")
        pages = gr.Markdown(elem_id="ds-pages")
    grid = gr.Gallery(label="images: the shaded part is cut away by the crop", columns=6, height=620,
                      allow_preview=False, elem_id="ds-grid", object_fit="contain")
    with gr.Row():
        with gr.Column(scale=3):
            selected = gr.Markdown("select an image to edit its caption", elem_id="ds-selected")
            caption = gr.Textbox(label="caption", lines=2, elem_id="ds-caption")
        with gr.Column(scale=1):
            save = gr.Button("Save caption", elem_id="ds-save")
            saved = gr.Markdown(elem_id="ds-save-status")
    problems = gr.Dataframe(headers=["path", "kind", "reason"], interactive=False, label="problems and notes",
                            elem_id="ds-problems", wrap=True, max_height=300)

    def show(view, bucket_value, cropped_value, kind_value, page_value):
        if view is None:
            return [], [], "", 1
        picked = ds.filter_rows(view, bucket_value, float(cropped_value or 0), kind_value)
        count = ds.page_count(len(picked))
        number = min(max(1, int(page_value or 1)), count)
        items = ds.page_items(view, picked, number)
        return items, picked, f"page {number} of {count} ({len(picked)} of {len(view.rows)} images)", number

    def on_open(text):
        started = time.perf_counter()
        try:
            view = ds.open_dataset(workspace, text)
        except FinetuneError as err:
            return (None, f"**cannot open**: {err}", _chart_frame(None), [], gr.update(choices=[ds.ALL], value=ds.ALL),
                    gr.update(choices=[ds.ALL], value=ds.ALL), [], [], [], "", 1, 0)
        scanned = time.perf_counter() - started
        items, picked, pages_text, number = show(view, ds.ALL, 0, ds.ALL, 1)
        shown = time.perf_counter() - started - scanned
        used = [b for b, _, n in view.bucket_table() if n]
        message = (f"{len(view.rows)} images in {len(used)} of {len(view.buckets)} buckets, {len(view.problems)} "
                   f"problems and notes; scanned in {scanned:.1f} s, first page in {shown:.2f} s")
        return (view, message, _chart_frame(view), view.bucket_table(),
                gr.update(choices=[ds.ALL] + used, value=ds.ALL),
                gr.update(choices=[ds.ALL, ds.ANY_NOTE] + view.kinds(), value=ds.ALL),
                [list(p) for p in view.problems], items, picked, pages_text, number, 0)

    # Every filter goes back to "all" on open, the slider too: the grid shows what the controls say.
    open_outputs = [view_state, status, chart, table, bucket, kind, problems, grid, picked_state, pages, page, cropped]
    open_btn.click(on_open, source, open_outputs)
    source.submit(on_open, source, open_outputs)

    def on_filter(view, b, c, k, p):
        return show(view, b, c, k, p)

    for control in (bucket, kind):
        control.input(lambda v, b, c, k: on_filter(v, b, c, k, 1), [view_state, bucket, cropped, kind],
                      [grid, picked_state, pages, page])
    cropped.release(lambda v, b, c, k: on_filter(v, b, c, k, 1), [view_state, bucket, cropped, kind],
                    [grid, picked_state, pages, page])
    page.submit(on_filter, [view_state, bucket, cropped, kind, page], [grid, picked_state, pages, page])

    def on_select(view, picked, page_value, previous, loaded, current, evt: gr.SelectData):
        index = picked[(int(page_value or 1) - 1) * ds.PAGE_SIZE + evt.index]
        row = view.rows[index]
        text, origin = ds.caption_for_editing(view, row)
        notes = "".join(f"\n- {n}" for n in row["notes"])
        warning = ""
        if previous is not None and previous != index and current != loaded:
            # Never silently: the edit is still in this message to copy back.
            warning = f"**not saved**: your edit of {view.rows[previous]['path']} was left: {current!r}"
        return (index, f"**{row['abs_path']}**: {ds.label(row)}\n\ncaption file: {origin}{notes}", text, warning,
                text)

    grid.select(on_select, [view_state, picked_state, page, selected_state, loaded_state, caption],
                [selected_state, selected, caption, saved, loaded_state])

    def on_save(view, index, text, b, c, k, p):
        if view is None or index is None:
            return "select an image first", *[gr.update()] * 6
        try:
            path = ds.save_caption(workspace, view, index, text)
        except FinetuneError as err:
            return f"**not saved**: {err}", *[gr.update()] * 6
        written = view.rows[index]["caption"]  # as saved: one line
        return (f"saved {workspace.relative(path)}", *show(view, b, c, k, p), written, written)

    save.click(on_save, [view_state, selected_state, caption, bucket, cropped, kind, page],
               [saved, grid, picked_state, pages, page, loaded_state, caption])
