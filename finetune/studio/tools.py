"""The Tools tab: merge, convert, resize, extract, sample and caption, each calling the function its CLI command calls.

Inputs must exist inside the workspace and outputs must not exist yet: a tool never replaces a file.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from finetune.errors import FinetuneError
from finetune.studio.paths import PathRefused, Workspace


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


def run_merge(workspace: Workspace, base: str, loras: str, out: str, dtype: str) -> str:
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


def _guarded(fn):
    """Run a tool; a toolkit error becomes the message shown, as the CLI prints it."""
    def call(*args, progress=gr.Progress(track_tqdm=True)):
        try:
            return fn(*args)
        except FinetuneError as err:
            return f"**error**: {err}"
    return call


def build(workspace: Workspace) -> None:
    with gr.Tab("Merge", id="tool-merge"):
        base = gr.Textbox(label="base model (diffusers folder or single .safetensors)", elem_id="merge-base")
        loras = gr.Textbox(label="LoRAs, one per line: path or path:weight", lines=3, elem_id="merge-loras")
        dtype = gr.Dropdown(["keep", "fp16", "bf16", "fp32"], value="keep", label="dtype", elem_id="merge-dtype")
        out = gr.Textbox(label="output (must not exist)", elem_id="merge-out")
        result = gr.Markdown(elem_id="merge-result")
        gr.Button("Merge", variant="primary", elem_id="merge-run").click(
            _guarded(lambda *a: run_merge(workspace, *a)), [base, loras, out, dtype], result)
    with gr.Tab("Convert", id="tool-convert"):
        lora = gr.Textbox(label="LoRA", elem_id="convert-lora")
        to = gr.Radio(["kohya", "diffusers"], value="diffusers", label="to", elem_id="convert-to")
        out = gr.Textbox(label="output (must not exist)", elem_id="convert-out")
        result = gr.Markdown(elem_id="convert-result")
        gr.Button("Convert", variant="primary", elem_id="convert-run").click(
            _guarded(lambda *a: run_convert(workspace, *a)), [lora, to, out], result)
    with gr.Tab("Resize", id="tool-resize"):
        lora = gr.Textbox(label="LoRA", elem_id="resize-lora")
        rank = gr.Number(8, label="new rank (at most, per module)", precision=0, minimum=1, elem_id="resize-rank")
        energy = gr.Number(0, label="energy (e.g. 0.95; 0 = off)", minimum=0, maximum=1, elem_id="resize-energy")
        out = gr.Textbox(label="output (must not exist)", elem_id="resize-out")
        result = gr.Markdown(elem_id="resize-result")
        gr.Button("Resize", variant="primary", elem_id="resize-run").click(
            _guarded(lambda *a: run_resize(workspace, *a)), [lora, rank, energy, out], result)
    with gr.Tab("Extract", id="tool-extract"):
        base = gr.Textbox(label="base model", elem_id="extract-base")
        tuned = gr.Textbox(label="fine-tuned model", elem_id="extract-tuned")
        rank = gr.Number(16, label="rank", precision=0, minimum=1, elem_id="extract-rank")
        out = gr.Textbox(label="output (must not exist)", elem_id="extract-out")
        result = gr.Markdown(elem_id="extract-result")
        gr.Button("Extract", variant="primary", elem_id="extract-run").click(
            _guarded(lambda *a: run_extract(workspace, *a)), [base, tuned, rank, out], result)
    with gr.Tab("Sample", id="tool-sample"):
        model = gr.Textbox(label="model (diffusers folder or single .safetensors)", elem_id="sample-model")
        sample_loras = gr.Textbox(label="LoRAs applied unmerged, one per line: path or path:weight (optional)",
                                  lines=2, elem_id="sample-loras")
        prompt = gr.Textbox(label="prompt", elem_id="sample-prompt")
        negative = gr.Textbox(label="negative prompt", elem_id="sample-negative")
        with gr.Row():
            seed = gr.Number(0, label="seed", precision=0)
            steps = gr.Number(20, label="steps", precision=0, minimum=1)
            height = gr.Number(1024, label="height", precision=0, minimum=64, step=64)
            width = gr.Number(1024, label="width", precision=0, minimum=64, step=64)
        out = gr.Textbox(label="output PNG (must not exist)", elem_id="sample-out")
        result = gr.Markdown(elem_id="sample-result")
        image = gr.Image(label="sample", elem_id="sample-image", type="filepath")

        def sample(*args):
            try:
                return run_sample(workspace, *args)
            except FinetuneError as err:
                return f"**error**: {err}", None

        gr.Button("Render", variant="primary", elem_id="sample-run").click(
            sample, [model, sample_loras, prompt, negative, seed, steps, height, width, out], [result, image])
    with gr.Tab("Caption", id="tool-caption"):
        folder = gr.Textbox(label="image folder (images without a caption file get one)", elem_id="caption-folder")
        model = gr.Textbox(label="local image-to-text model folder", elem_id="caption-model")
        ext = gr.Radio([".txt", ".caption"], value=".txt", label="caption extension", elem_id="caption-ext")
        result = gr.Markdown(elem_id="caption-result")
        gr.Button("Caption", variant="primary", elem_id="caption-run").click(
            _guarded(lambda *a: run_caption(workspace, *a)), [folder, model, ext], result)
