"""What a run tells the outside while it trains: `logs/metrics.jsonl`, `status.json` and the trackers.

Both files live in the run folder, so the studio (or `tail -f`) can follow a run that the CLI started,
and a run started from the studio is an ordinary run folder. Only the main process writes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from finetune.io import write_text_atomic

if TYPE_CHECKING:
    import torch

# torch is imported where a step's numbers are read: the studio reads the run files without it.

METRICS_FILE = Path("logs") / "metrics.jsonl"
STATUS_FILE = "status.json"


class RunLog:
    """Appends one JSON line per logged step and keeps `status.json` current.

    Args:
        output_dir: the run folder (`output.dir`).
        accelerator: only its main process writes; `log` also goes to its trackers when `trackers`.
    """

    def __init__(self, output_dir: Path, accelerator, *, trackers: bool, max_steps: int) -> None:
        self.output_dir = Path(output_dir)
        self.accelerator = accelerator
        self.trackers = trackers
        self.max_steps = max_steps
        self.main = accelerator.is_main_process

    @classmethod
    def open(cls, cfg, accelerator, step: int) -> RunLog:
        """The run's log from `step` on; starts the trackers that `logging.report_to` names."""
        trackers = cfg.logging.report_to != "none"
        if trackers and accelerator.is_main_process:
            # wandb writes beside TensorBoard's events (logs/), not into the shell's current folder.
            (cfg.output.dir / "logs").mkdir(parents=True, exist_ok=True)
            accelerator.init_trackers(cfg.logging.project, config=flat_config(cfg.model_dump(mode="json")),
                                      init_kwargs={"wandb": {"dir": str(cfg.output.dir / "logs")}})
        log = cls(cfg.output.dir, accelerator, trackers=trackers, max_steps=cfg.training.max_steps)
        log.start(step)
        return log

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / METRICS_FILE

    def start(self, step: int) -> None:
        """A run (re)starts at `step`: lines a killed run logged past its last checkpoint go, so the curve
        never doubles back."""
        if not self.main:
            return
        path = self.metrics_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and _step_of(line) <= step]
            write_text_atomic(path, "".join(f"{line}\n" for line in kept))
        self.status("running", step)

    def log(self, step: int, epoch: int, values: dict[str, float]) -> None:
        if self.trackers:
            self.accelerator.log(values, step=step)
        if self.main:
            line = json.dumps({"step": step, "epoch": epoch, **values, "time": round(time.time(), 3)})
            with open(self.metrics_path, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def status(self, state: str, step: int, error: str | None = None) -> None:
        """`state` is running, stopped, finished or failed; `error` the failure's one line."""
        if not self.main:
            return
        write_text_atomic(self.output_dir / STATUS_FILE, json.dumps({
            "state": state, "step": step, "max_steps": self.max_steps, "pid": os.getpid(), "error": error,
            "updated": round(time.time(), 3)}, indent=2) + "\n")


def progress_bar(total: int, initial: int, enabled: bool, clock: Callable[[], float] = time.time, **tqdm_args):
    """The step bar on the console (main process only); when not `enabled`, a bar that draws nothing.

    `clock` (seconds) times the bar's rate and ETA; tests pass one they advance by hand.
    """
    bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, disable=not enabled,
               **tqdm_args)
    if enabled:  # tqdm reads its clock from `_time` (its own `time.time` by default) and starts it at creation
        bar._time = clock
        bar.start_t = bar.last_print_t = clock()
    return bar


@contextlib.contextmanager
def paused(bar):
    """Time spent inside the block (rendering samples) does not count toward the bar's rate and ETA."""
    try:
        yield
    finally:
        bar.unpause()


def step_metrics(loss: torch.Tensor, lr: float, images_per_s: float, grad_norm: torch.Tensor | None = None,
                 norms_scaled: torch.Tensor | None = None, largest_norm: torch.Tensor | None = None,
                 nan_skipped: int = 0) -> dict[str, float]:
    """One logged step's numbers as plain floats (reading device tensors is the host sync of a logging step)."""
    import torch

    metrics = {"loss": float(loss), "lr": lr, "images_per_s": images_per_s}
    if nan_skipped:  # steps skipped for NaN/inf losses so far in the run: shown once there are any
        metrics["nan_skipped"] = nan_skipped
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    if largest_norm is not None:  # lora.max_norm: what kohya logs beside the loss
        metrics["keys_scaled"], metrics["max_norm"] = int(norms_scaled), float(largest_norm)
    if torch.cuda.is_available():
        metrics["memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return metrics


def flat_config(data: dict, prefix: str = "") -> dict:
    """Nested config tables as `table.key` -> scalar, as trackers store hyperparameters."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def read_metrics(output_dir: Path) -> list[dict]:
    """The logged steps of a run, oldest first: every complete line (the last may still be being written,
    or cut short by a kill)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return 1 << 62  # unreadable: dropped with the lines past the checkpoint
