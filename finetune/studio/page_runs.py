"""The Runs tab: start, stop and resume `finetune train`; every run folder in the workspace with its progress."""

from __future__ import annotations

import hashlib
import time
from functools import lru_cache
from pathlib import Path

import gradio as gr
import pandas as pd

from finetune.config import load_config
from finetune.errors import FinetuneError
from finetune.studio import runs
from finetune.studio.estimate import preflight
from finetune.studio.paths import Workspace

REFRESH_S = 2.0
CHARTS = (("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "grad norm"), ("images_per_s", "images/s"))


def _frame(metrics: list[dict], key: str):
    points = [(m["step"], float(m[key])) for m in metrics if isinstance(m.get(key), (int, float))]
    return pd.DataFrame(points, columns=["step", key])


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(seconds)
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m {seconds % 60:02d}s"


def estimate_line(folder: Path) -> str:
    """What the trainer printed as its pre-flight estimate (CUDA runs), else the studio's for a 24 GiB card."""
    for line in reversed(runs.log_tail(folder, 400).splitlines()):
        if line.startswith("estimated peak GPU memory"):
            return line
    config = Path(folder) / runs.RESOLVED_CONFIG
    return _config_estimate(str(config), config.stat().st_mtime_ns if config.exists() else 0)


@lru_cache(maxsize=32)
def _config_estimate(config: str, mtime_ns: int) -> str:
    """Keyed by the resolved config's mtime: a refresh every few seconds must not rebuild the estimate."""
    if not mtime_ns:
        return ""
    try:
        return preflight(load_config(config), 24.0)
    except FinetuneError as err:
        return f"no estimate: {err}"


def run_details(workspace: Workspace, folder_text: str | None) -> list:
    """Progress, four charts, samples, estimate and log tail of one run (empty when none is chosen)."""
    empty = [_frame([], key) for key, _ in CHARTS]
    if not folder_text:
        return ["no run selected", *empty, [], "", ""]
    try:
        folder = workspace.existing(folder_text, "run folder")
    except FinetuneError as err:
        return [f"**{err}**", *empty, [], "", ""]
    state = runs.run_state(folder)
    metrics = runs.read_metrics(folder)
    lines = [f"**{workspace.relative(folder)}**: {state.describe()}"]
    if state.max_steps:
        done = min(1.0, state.step / state.max_steps)
        lines.append(f"progress {done:.0%}" + (f", ETA {_duration(runs.eta_seconds(metrics, state.max_steps))}"
                                                 if state.state == "running" else ""))
    losses = [m for m in metrics if isinstance(m.get("loss"), (int, float))]  # val_loss lines have none
    if losses:
        lines.append(f"last logged step {losses[-1]['step']}: loss {losses[-1]['loss']:.4f}")
    skipped = max((int(m.get("nan_skipped") or 0) for m in metrics), default=0)
    if skipped:  # the trainer's count of steps it skipped for NaN/inf losses (training.max_nan_steps)
        lines.append(f"{skipped} step{'s' if skipped > 1 else ''} skipped: loss or gradients NaN/inf")
    gallery = [(str(path), f"step {step}") for path, step in runs.samples(folder)]
    charts = [_frame(metrics, key) for key, _ in CHARTS]
    return ["\n\n".join(lines), *charts, gallery, estimate_line(folder) if state.state != "not started" else "",
            runs.log_tail(folder)]


def _digest(value) -> str:
    """A short fingerprint of an output's value (DataFrames by their JSON)."""
    text = value.to_json() if hasattr(value, "to_json") else repr(value)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def runs_table(workspace: Workspace) -> list[list]:
    rows = []
    for folder in runs.list_runs(workspace):
        state = runs.run_state(folder)
        # status.json's time; without one, the newest of the run's own files.
        when = state.updated or runs.last_change(folder)
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when)) if when else ""
        rows.append([workspace.relative(folder), state.describe(), updated])
    return rows


def build(workspace: Workspace, demo: gr.Blocks) -> tuple[gr.Timer, gr.State]:
    with gr.Row():
        config = gr.Textbox(label="config to train (inside the workspace)", elem_id="run-config", scale=3)
        overrides = gr.Textbox(label="overrides, one section.key=value per line (as --set)", lines=2,
                               elem_id="run-set", scale=3)
        start = gr.Button("Start", variant="primary", elem_id="run-start", scale=1)
    status = gr.Markdown(elem_id="run-status")
    table = gr.Dataframe(headers=["run", "state", "updated"], interactive=False, elem_id="runs-table",
                         label="runs in the workspace", max_height=240)
    with gr.Row():
        pick = gr.Dropdown([], label="run", elem_id="run-select", allow_custom_value=True, scale=3)
        stop = gr.Button("Stop (saves a checkpoint)", variant="stop", elem_id="run-stop", scale=1)
        resume = gr.Button("Resume", elem_id="run-resume", scale=1)
    progress = gr.Markdown(elem_id="run-progress")
    with gr.Row():
        plots = [gr.LinePlot(_frame([], key), x="step", y=key, title=title, elem_id=f"run-{key}", height=220)
                 for key, title in CHARTS[:2]]
    with gr.Row():
        plots += [gr.LinePlot(_frame([], key), x="step", y=key, title=title, elem_id=f"run-{key}", height=220)
                  for key, title in CHARTS[2:]]
    samples = gr.Gallery(label="samples by step", columns=6, height=300, elem_id="run-samples", allow_preview=True)
    estimate = gr.Markdown(elem_id="run-estimate")
    log = gr.Textbox(label="console.log (end)", lines=14, max_lines=14, elem_id="run-log", autoscroll=True)
    details = [progress, *plots, samples, estimate, log]

    def refresh(current, sent):
        """Every output, but only those that changed since this tab last got them (`sent`: their digests),
        so a two-second refresh does not resend charts and sample images that stayed the same."""
        rows = runs_table(workspace)
        names = [row[0] for row in rows]
        chosen = current if current in names else (names[0] if names else None)
        values = [rows, gr.update(choices=names, value=chosen), *run_details(workspace, chosen)]
        digests = [_digest(v) for v in values]
        sent = sent or {}
        out = [gr.skip() if sent.get(i) == d else v for i, (v, d) in enumerate(zip(values, digests))]
        return [*out, dict(enumerate(digests))]

    def on_start(config_text, override_text):
        try:
            out, pid = runs.start_run(workspace, config_text, overrides=override_text.splitlines())
        except FinetuneError as err:
            return [f"**not started**: {err}", gr.update(), gr.update(), *[gr.update()] * len(details)]
        chosen = workspace.relative(out)
        rows = runs_table(workspace)
        return [f"started `finetune train {config_text}` (pid {pid}) in {chosen}", rows,
                gr.update(choices=[r[0] for r in rows], value=chosen), *run_details(workspace, chosen)]

    start.click(on_start, [config, overrides], [status, table, pick, *details])

    def on_stop(current):
        try:
            return runs.stop_run(workspace.existing(current or "", "run folder"))
        except FinetuneError as err:
            return f"**{err}**"

    stop.click(on_stop, pick, status)

    def on_resume(current):
        try:
            folder = workspace.existing(current or "", "run folder")
            out, pid = runs.resume_run(workspace, folder)
        except FinetuneError as err:
            return f"**not resumed**: {err}"
        return f"resumed {workspace.relative(out)} (pid {pid}) with `finetune train --resume {workspace.relative(out)}`"

    resume.click(on_resume, pick, status)
    pick.input(lambda c: run_details(workspace, c), pick, details)
    sent = gr.State({})
    # Inactive until the Runs tab is shown (app.py switches it): other tabs pay nothing for it.
    timer = gr.Timer(REFRESH_S, active=False)
    timer.tick(refresh, [pick, sent], [table, pick, *details, sent], show_progress="hidden")
    # A reload or a second tab starts from the disk, like this tab did: the newest run is shown.
    demo.load(refresh, [pick, sent], [table, pick, *details, sent])
    return timer, sent
