"""The studio in headless Chromium: every page, on the tiny model and images made here."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Each drives a real browser against a real studio (seconds): `-m "not slow"` leaves them out.
pytestmark = [pytest.mark.browser, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[3]


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} :is(textarea, input)").first


def wait_text(page, selector: str, pattern: str, timeout_s: float = 30.0, changed_from: str | None = None) -> str:
    """The element's text once it matches `pattern` (a regex) and differs from `changed_from`."""
    deadline = time.time() + timeout_s
    text = ""
    while time.time() < deadline:
        if page.locator(selector).count():
            markdown = page.locator(selector).first.locator('[data-testid="markdown"]')
            # A Markdown's own text, without Gradio's progress overlay ("processing | 0.4s") around it.
            text = (markdown if markdown.count() else page.locator(selector)).first.inner_text()
            busy = "processing |" in text or "queue:" in text  # Gradio's progress text over the output
            if re.search(pattern, text) and text != changed_from and not busy:
                return text
        time.sleep(0.2)
    raise AssertionError(f"{selector} never matched {pattern!r}; last text: {text!r}")


def open_dataset(page, text: str) -> str:
    before = page.locator("#ds-status").inner_text()
    field(page, "ds-source").fill(text)
    page.click("#ds-open")
    return wait_text(page, "#ds-status", r"images in|cannot open", changed_from=before)


# The run is started first and checked last: the trainer's start-up (imports, model, caches: ~10 s on
# 2 cores) overlaps the other tests instead of adding to the suite's time. It trains into its own
# output.dir, so the dataset scans of runs/first never touch its files.
RUN_DIR = "runs/studio"
STARTED: dict[str, int] = {}


def test_a_run_starts_from_the_studio(page, studio_workspace):
    page.get_by_role("tab", name="Runs").click()
    field(page, "run-config").fill("train.toml")
    field(page, "run-set").fill(f"training.max_steps=2000\noutput.dir=\"{RUN_DIR}\"")
    page.click("#run-start")
    status = wait_text(page, "#run-status", r"started finetune train train.toml|not started")
    assert f"in {RUN_DIR}" in status
    STARTED["pid"] = int(re.search(r"pid (\d+)", status).group(1))
    wait_text(page, "#run-progress", rf"{RUN_DIR}\W+running", timeout_s=30)
    second = page.context.new_page()  # a second tab reads the same folders: the same state
    second.goto(page.url)
    second.get_by_role("tab", name="Runs").click()
    wait_text(second, "#runs-table", rf"{RUN_DIR}\s+running")
    second.close()


def test_dataset_page_shows_every_bucket_and_the_crop_of_a_wide_image(page, studio_workspace):
    from PIL import Image

    from bucketing.buckets import make_buckets

    open_dataset(page, "train.toml")
    table = page.locator("#ds-buckets").inner_text()
    for bucket in make_buckets(128, 64, 64, 256, 4.0):  # the plan of train.toml
        assert f"{bucket.height}x{bucket.width}" in table
    assert "wide.png" in page.locator("#ds-grid").inner_text()

    status = open_dataset(page, "square.toml")  # square only: the 4:1 image keeps its centre quarter
    assert "5 images in 1 of 1 buckets" in status
    wide = page.locator('#ds-grid img[alt*="wide.png"]')
    assert "cut 75 %" in wide.get_attribute("alt")
    thumb = Image.open(io.BytesIO(page.request.get(wide.get_attribute("src")).body())).convert("RGB")
    w, h = thumb.size
    assert (w, h) == (256, 64)
    edge, centre = sum(thumb.getpixel((20, h // 2))), sum(thumb.getpixel((w // 2 + 20, h // 2)))
    assert edge < centre - 200  # the three cut-away quarters are shaded, the kept one is not
    page.locator("#ds-cropped input[type=number]").fill("50")
    page.locator("#ds-cropped input[type=number]").press("Enter")


def test_caption_edit_writes_only_the_sidecar(page, studio_workspace):
    folder = studio_workspace / "captions"
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    assert "3 images" in open_dataset(page, "captions")
    page.locator('#ds-grid img[alt^="c1.png"]').click()
    wait_text(page, "#ds-selected", "c1.png")
    assert field(page, "ds-caption").input_value() == "caption 1"
    field(page, "ds-caption").fill("a blue square, edited in the studio")
    page.click("#ds-save")
    wait_text(page, "#ds-save-status", "saved captions/c1.txt")
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    assert set(after) == set(before)
    assert [name for name in after if after[name] != before[name]] == ["c1.txt"]
    assert (folder / "c1.txt").read_text(encoding="utf-8") == "a blue square, edited in the studio\n"
    assert "edited in the studio" in page.locator('#ds-grid img[alt^="c1.png"]').get_attribute("alt")
    field(page, "ds-caption").fill("an edit nobody saves")
    page.locator('#ds-grid img[alt^="c2.png"]').click()  # another image: the edit is not dropped in silence
    assert "an edit nobody saves" in wait_text(page, "#ds-save-status", "not saved")
    assert (folder / "c1.txt").read_text(encoding="utf-8") == "a blue square, edited in the studio\n"


def test_invalid_config_value_shows_the_cli_message_next_to_the_field(page, studio_workspace):
    page.get_by_role("tab", name="Config").click()
    field(page, "cfg-path").fill("train.toml")
    page.click("#cfg-open")
    wait_text(page, "#cfg-status", "opened train.toml")
    wait_text(page, "#cfg-estimate", "estimated peak GPU memory")
    rate = field(page, "cfg-training-learning_rate")
    rate.fill("-1")
    rate.press("Enter")
    # The CLI's own message: `finetune train train.toml --set training.learning_rate=-1` prints this line.
    from finetune.config import load_config
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config(studio_workspace / "train.toml", ["training.learning_rate=-1"])
    cli_line = str(err.value)
    assert cli_line == "train.toml: training.learning_rate = -1: Input should be greater than 0"
    shown = wait_text(page, "#err-training-learning_rate", "greater than 0")
    assert cli_line in shown
    box = page.locator("#cfg-training-learning_rate").bounding_box()
    error = page.locator("#err-training-learning_rate").bounding_box()
    assert 0 <= error["y"] - (box["y"] + box["height"]) < 60 and abs(error["x"] - box["x"]) < 40  # right under it


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _stand_in_metrics(folder: Path, last_step: int) -> None:
    """Only for a trainer from before the run-folder contract: the lines it writes, so the chart has data."""
    now = time.time()
    lines = [json.dumps({"step": s, "loss": 1.0 / s, "lr": 2e-3, "grad_norm": 0.5, "images_per_s": 8.0,
                         "epoch": 0, "time": now - (last_step - s) * 0.2}) for s in range(1, last_step + 1)]
    (folder / "logs" / "metrics.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def test_the_run_trains_charts_samples_and_stops_with_a_checkpoint(page, studio_workspace):
    if "pid" not in STARTED:
        pytest.skip("test_a_run_starts_from_the_studio did not start the run")
    run = studio_workspace / RUN_DIR
    try:
        step = _train_and_stop(page, run)
    finally:
        _end(STARTED["pid"])  # the trainer outlives the studio by design: a failed test must not leave it running
    # `finetune train --resume` continues it, in the background while the next tests use the browser;
    # test_the_stopped_run_resumes_from_the_cli waits for it.
    STARTED["resume"] = subprocess.Popen(
        [sys.executable, "-m", "finetune", "train", "train.toml", "--resume", "--set", f"output.dir=\"{RUN_DIR}\"",
         "--set", f"training.max_steps={step + 1}", "--set", "sample.prompts=[]"],  # no pipeline to load at the end
        cwd=studio_workspace, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    STARTED["step"] = step


def _end(pid: int, grace_s: float = 30.0) -> None:
    """Wait for the trainer to exit (after a stop it saves, then exits); else SIGINT, then SIGKILL."""
    import signal

    def gone(wait_s: float) -> bool:
        deadline = time.time() + wait_s
        while time.time() < deadline:
            try:
                os.kill(pid, 0)
                if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
                    return True  # exited; the studio, its parent, collects it on its next look
            except (ProcessLookupError, FileNotFoundError):
                return True
            time.sleep(0.1)
        return False

    for sig in (None, signal.SIGINT, signal.SIGKILL):
        if sig is not None:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return
        if gone(grace_s if sig is None else 10.0):
            return


def _train_and_stop(page, run) -> int:
    page.get_by_role("tab", name="Runs").click()
    page.wait_for_selector('#run-samples img', timeout=120_000)  # rendered inside the loop: it trains
    if not (run / "logs" / "metrics.jsonl").exists():  # the first step is always logged, before this sample
        _stand_in_metrics(run, 2)
    wait_text(page, "#run-progress", r"last logged step ([2-9]|\d\d+): loss", timeout_s=30)
    page.wait_for_selector("#run-loss .mark-line path", state="attached", timeout=15_000)

    page.click("#run-stop")
    wait_text(page, "#run-status", "stop requested")
    shown = wait_text(page, "#runs-table", r"stopped at step \d+", timeout_s=90)  # generous: a busy CI box
    step = int(re.search(r"stopped at step (\d+)", shown).group(1))
    assert (run / "checkpoints" / f"step-{step:06d}" / "train_state.json").is_file()
    assert "--- studio" in (run / "logs" / "console.log").read_text(encoding="utf-8")
    return step


def test_tools_page_merges_a_lora(page, studio_workspace):
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # (64, 64) in the tiny UNet
    save_file({f"{name}.lora_down.weight": torch.randn(4, 64, generator=gen) * 0.3,
               f"{name}.lora_up.weight": torch.randn(64, 4, generator=gen) * 0.3,
               f"{name}.alpha": torch.tensor(4.0)}, str(studio_workspace / "style.safetensors"))
    page.get_by_role("tab", name="Tools").click()
    field(page, "merge-base").fill("model")
    field(page, "merge-loras").fill("style.safetensors:0.8")
    field(page, "merge-out").fill("merged")
    page.click("#merge-run")
    shown = wait_text(page, "#merge-result", r"output: merged|error", timeout_s=60)
    assert "style.safetensors: 1 modules" in shown and "output: merged" in shown
    assert (studio_workspace / "merged" / "unet").is_dir()
    page.click("#merge-run")  # the same output again: refused, never written over
    assert "already exists" in wait_text(page, "#merge-result", "already exists")


def test_a_path_outside_the_workspace_is_refused(page, studio_workspace, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    assert "outside the workspace" in open_dataset(page, str(tmp_path / "elsewhere"))
    assert "outside the workspace" in open_dataset(page, "../")
    page.get_by_role("tab", name="Tools").click()
    field(page, "merge-base").fill("model")
    field(page, "merge-loras").fill("style.safetensors")
    field(page, "merge-out").fill("../escaped")
    before = page.locator("#merge-result").inner_text()
    page.click("#merge-run")
    assert "outside the workspace" in wait_text(page, "#merge-result", "outside|error", changed_from=before)
    assert not (studio_workspace.parent / "escaped").exists()


def test_the_stopped_run_resumes_from_the_cli(page, studio_workspace):
    if "resume" not in STARTED:
        pytest.skip("the run was not stopped with a checkpoint")
    out, err = STARTED["resume"].communicate(timeout=240)
    assert STARTED["resume"].returncode == 0, err[-2000:]
    assert f"done: step {STARTED['step'] + 1}" in out
    assert (studio_workspace / RUN_DIR / "lora.safetensors").is_file()
    page.get_by_role("tab", name="Runs").click()
    wait_text(page, "#runs-table", r"finished, \d+ steps", timeout_s=30)  # a CLI run shows up in the studio
