"""The Runs page's text: what the run's files say, shown without a browser."""

from __future__ import annotations

import json

from finetune.studio.page_runs import run_details
from finetune.studio.paths import Workspace


def test_steps_skipped_for_nan_losses_are_shown_with_the_progress(tmp_path):
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    lines = [{"step": 1, "loss": 0.5, "lr": 1e-4}, {"step": 2, "loss": 0.4, "lr": 1e-4, "nan_skipped": 2}]
    (run / "logs" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    progress = run_details(Workspace(tmp_path), "run")[0]
    assert "2 steps skipped: loss or gradients NaN/inf" in progress
    (run / "logs" / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    assert "skipped" not in run_details(Workspace(tmp_path), "run")[0]
