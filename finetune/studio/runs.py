"""Runs as the studio sees them: run folders read from disk, and `finetune train` processes started and stopped.

A run is its `output.dir`; there is no other store. State comes from `status.json` (written by the
trainer), else from what the folder holds (checkpoints, the final weights, the console log).
Training is the ordinary `python -m finetune train CONFIG [--resume]` process in its own session,
so it outlives the studio and a reopened studio finds it again through `status.json`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import tomllib

from finetune.config import check_output_dir, load_config
from finetune.errors import FinetuneError
from finetune.studio.paths import STUDIO_DIR, PathRefused, Workspace
from finetune.train.command import RESOLVED_CONFIG
from finetune.train.logs import STATUS_FILE, read_metrics  # the files the trainer writes, read its way

# finetune.train.checkpoint (torch) is imported where a run's checkpoints are read: the studio starts without it.

CONSOLE_LOG = Path("logs") / "console.log"
TAIL_BYTES = 64 * 1024
# Processes this studio started, by output folder: polled so a finished child is reaped (a zombie
# still answers kill(pid, 0)) and its exit code is known even without status.json.
_LAUNCHED: dict[Path, subprocess.Popen] = {}
# A start or resume that fails its checks (config, checkpoint, data) exits within seconds: the studio
# waits up to this long, so it can say "failed" with the error line instead of "started".
SETTLE_S = 10.0
# How `finetune train` ends without an error: done, or stopped by Ctrl-C/SIGINT after saving a checkpoint.
CLEAN_EXITS = (0, 130, -signal.SIGINT)


class RunFailed(FinetuneError):
    """The trainer the studio started exited with an error within its first seconds."""


@dataclass
class RunState:
    folder: Path
    state: str  # running, stopped, finished, failed, killed, not started
    step: int = 0
    max_steps: int | None = None
    error: str | None = None
    pid: int | None = None
    updated: float | None = None

    def describe(self) -> str:
        of = f"/{self.max_steps}" if self.max_steps else ""
        if self.state == "running":
            return f"running, step {self.step}{of}"
        if self.state == "stopped":
            return f"stopped at step {self.step}{of}"
        if self.state == "finished":
            return f"finished, {self.step} steps"
        if self.state in ("failed", "killed"):
            return f"{self.state} at step {self.step}{of}: {self.error or 'see the log'}"
        return self.state


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None while it is missing or half-written by someone else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def reap() -> None:
    """Collect the exit of every trainer this studio started that has ended, so none stays a zombie."""
    for proc in list(_LAUNCHED.values()):
        proc.poll()


def pid_alive(pid: int | None) -> bool:
    """The process exists and is not a zombie (an exited child not yet reaped)."""
    if not pid:
        return False
    for proc in list(_LAUNCHED.values()):
        if proc.pid == pid and proc.poll() is not None:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def eta_seconds(metrics: list[dict], max_steps: int | None, window: int = 20) -> float | None:
    """Seconds left at the pace of the last `window` logged steps; None until two have a time."""
    timed = [m for m in metrics if isinstance(m.get("time"), (int, float))][-window:]
    if not max_steps or len(timed) < 2 or timed[-1]["step"] <= timed[0]["step"]:
        return None
    pace = (timed[-1]["time"] - timed[0]["time"]) / (timed[-1]["step"] - timed[0]["step"])
    return max(0.0, (max_steps - timed[-1]["step"]) * pace)


def samples(folder: Path) -> list[tuple[Path, int]]:
    """Sample grids (`samples/step-NNNNNN*.png`) with their step, oldest first."""
    found = []
    for path in (Path(folder) / "samples").glob("step-*.png"):
        digits = path.stem.removeprefix("step-").split("-")[0]
        if digits.isdigit():
            found.append((path, int(digits)))
    return sorted(found, key=lambda item: (item[1], item[0].name))


def log_tail(folder: Path, lines: int = 40) -> str:
    """The end of `logs/console.log`; a progress bar's carriage-return updates keep only their last state."""
    path = Path(folder) / CONSOLE_LOG
    if not path.is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - TAIL_BYTES))
        text = fh.read().decode("utf-8", errors="replace")
    shown = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([line for line in shown if line.strip()][-lines:])


def error_line(folder: Path) -> str | None:
    """The last `error: ...` line the CLI printed, or a traceback's last line."""
    tail = log_tail(folder, 200).splitlines()
    for line in reversed(tail):
        if line.startswith("error:") or (line and not line.startswith(" ") and "Error" in line.split(":")[0]):
            return line
    return None


def resolved_config(folder: Path) -> dict:
    try:
        return tomllib.loads((Path(folder) / RESOLVED_CONFIG).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def run_state(folder: Path) -> RunState:
    """What the run in `folder` is doing, from `status.json`, else from its files and our own children."""
    folder = Path(folder)
    from finetune.train.checkpoint import list_checkpoints

    reap()
    status = read_json(folder / STATUS_FILE)
    checkpoints = list_checkpoints(folder / "checkpoints")
    last_ckpt = checkpoints[-1][0] if checkpoints else 0
    metrics_step = (read_metrics(folder) or [{"step": 0}])[-1]["step"]
    max_steps = resolved_config(folder).get("training", {}).get("max_steps")
    proc = _LAUNCHED.get(folder.resolve())
    if proc is not None and proc.poll() not in (None, *CLEAN_EXITS) and (status or {}).get("pid") != proc.pid:
        # Our latest start exited with an error before writing its own status: the older status.json is stale.
        return RunState(folder, "failed", last_ckpt, max_steps, error_line(folder) or f"exit code {proc.returncode}")
    if status is not None:
        # status.json is rewritten when the state changes; while running, the metrics are newer.
        step = max(int(status.get("step") or 0), metrics_step if status.get("state") == "running" else 0)
        state = RunState(folder, status.get("state", "unknown"), step, status.get("max_steps", max_steps),
                         status.get("error"), status.get("pid"), status.get("updated"))
        if state.state == "running" and not pid_alive(state.pid):
            state.state = "killed"  # the process is gone without saying so: a crash, kill -9 or power loss
            resume = f"resume continues from step {last_ckpt}" if last_ckpt else "no checkpoint yet: start it again"
            state.error = error_line(folder) or f"process {state.pid} is gone; {resume}"
        elif state.state == "failed" and not state.error:
            state.error = error_line(folder)
        return state
    step = max(metrics_step, last_ckpt)
    if proc is not None and proc.poll() is None:
        return RunState(folder, "running", step, max_steps, pid=proc.pid)
    if proc is not None and proc.returncode not in CLEAN_EXITS:
        return RunState(folder, "failed", step, max_steps, error_line(folder) or f"exit code {proc.returncode}")
    final = next(folder.glob("*.safetensors"), None)
    if final is not None and checkpoints and max_steps and last_ckpt >= max_steps:
        return RunState(folder, "finished", last_ckpt, max_steps)
    if checkpoints:
        return RunState(folder, "stopped", last_ckpt, max_steps)
    error = error_line(folder)
    return RunState(folder, "failed" if error else "not started", step, max_steps, error)


def is_run_folder(folder: Path) -> bool:
    return any((folder / name).exists() for name in (STATUS_FILE, RESOLVED_CONFIG, CONSOLE_LOG))


def list_runs(workspace: Workspace, max_depth: int = 4) -> list[Path]:
    """Run folders under the workspace, newest first; a run's own sub-folders are not searched."""
    found = []

    def walk(folder: Path, depth: int) -> None:
        if is_run_folder(folder):
            found.append(folder)
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            return
        for child in children:
            if not child.name.startswith(".") and child.name != STUDIO_DIR:
                walk(child, depth + 1)

    walk(workspace.root, 0)
    return sorted(found, key=last_change, reverse=True)


def last_change(folder: Path) -> float:
    times = [p.stat().st_mtime for p in (folder / STATUS_FILE, folder / CONSOLE_LOG, folder / RESOLVED_CONFIG)
             if p.exists()]
    return max(times, default=0.0)


def train_argv(config: Path, overrides: list[str]) -> list[str]:
    """The command the studio runs for a new run: the ordinary CLI, as an argv list (never through a shell)."""
    argv = [sys.executable, "-m", "finetune", "train", str(config)]
    for item in overrides:
        argv += ["--set", item]
    return argv


def resume_argv(folder: Path) -> list[str]:
    """The command the studio runs to continue a run: `finetune train --resume RUN_DIR`, as the CLI does it."""
    return [sys.executable, "-m", "finetune", "train", "--resume", str(folder)]


def start_run(workspace: Workspace, config_text: str, *, overrides: list[str] | None = None,
              settle_s: float = SETTLE_S) -> tuple[Path, int]:
    """Validate the config as the CLI would, then start `finetune train` detached; (output dir, pid).

    stdout and stderr go to `<output.dir>/logs/console.log` (appended: a resume keeps the history).

    Raises:
        ConfigError: the config does not validate (the CLI's own message).
        PathRefused: a path of the config lies outside the workspace, or the run is already running.
        RunFailed: the trainer exited with an error within `settle_s` seconds (names its error line).
    """
    config = workspace.existing(config_text, "config")
    overrides = [o for o in (overrides or []) if o.strip()]
    from finetune.train.checkpoint import check_fresh_start

    out = _checked_output(workspace, load_config(config, overrides))
    check_fresh_start(out / "checkpoints")  # the trainer's own refusal, before a process starts
    return out, _launch(train_argv(config, overrides), out, config.parent, settle_s)


def resume_run(workspace: Workspace, folder: Path, *, settle_s: float = SETTLE_S) -> tuple[Path, int]:
    """Continue the run in `folder` as `finetune train --resume RUN_DIR` does: its resolved config, its
    checkpoint, the same run as every other way to resume; (output dir, pid).

    Raises:
        PathRefused: no resolved config, a path outside the workspace, or the run is already running.
        RunFailed: the trainer refused the resume (or failed) within `settle_s` seconds, with its error line.
    """
    folder = Path(folder)
    out = _checked_output(workspace, load_config(resume_config(folder)))
    return out, _launch(resume_argv(folder), out, folder, settle_s)


def _checked_output(workspace: Workspace, cfg) -> Path:
    out = workspace.resolve(cfg.output.dir, "output.dir")
    workspace.resolve(cfg.model.pretrained, "model.pretrained")
    for subset in cfg.dataset.subsets:
        workspace.resolve(subset.folder or subset.hf_dataset, "dataset.subsets.folder")
    check_output_dir(cfg.output, cfg.dataset)  # the trainer's own refusal: console.log would land among the images
    current = run_state(out)
    if current.state == "running":
        raise PathRefused(f"{out}: a run is already training there (pid {current.pid}); stop it first")
    return out


def _launch(argv: list[str], out: Path, cwd: Path, settle_s: float) -> int:
    log_path = out / CONSOLE_LOG
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n--- studio {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv[1:])}\n".encode())
        log.flush()
        # A new session: closing the studio (or Ctrl-C in its terminal) does not reach the trainer.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=cwd, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _LAUNCHED[out.resolve()] = proc
    _settle(proc, out, settle_s)
    return proc.pid


def _settle(proc: subprocess.Popen, out: Path, settle_s: float) -> None:
    """Wait until the trainer writes its own status (setup done), exits, or `settle_s` pass.

    Raises:
        RunFailed: it exited with an error; the message is its last error line.
    """
    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            if code not in CLEAN_EXITS:
                raise RunFailed(f"{out.name}: finetune train exited with code {code}: "
                                f"{error_line(out) or 'see ' + str(out / CONSOLE_LOG)}")
            return
        if (read_json(out / STATUS_FILE) or {}).get("pid") == proc.pid:
            return
        time.sleep(0.2)


def resume_config(folder: Path) -> Path:
    """The config a resume of `folder` uses: the run's resolved config (paths absolute, profile fixed)."""
    path = Path(folder) / RESOLVED_CONFIG
    if not path.is_file():
        raise PathRefused(f"{folder}: no {RESOLVED_CONFIG}; this run never got past its setup, start it anew")
    return path


def stop_run(folder: Path) -> str:
    """Ask the run to stop as Ctrl-C does: SIGINT; the trainer saves a checkpoint, then exits."""
    state = run_state(folder)
    if state.state != "running" or not state.pid:
        return f"{folder.name}: not running ({state.describe()})"
    try:
        # A studio-started trainer leads its own process group: signal the group, as a terminal's
        # Ctrl-C does (data-loader workers included). Otherwise only the process itself.
        if os.getpgid(state.pid) == state.pid:
            os.killpg(state.pid, signal.SIGINT)
        else:
            os.kill(state.pid, signal.SIGINT)
    except ProcessLookupError:
        return f"{folder.name}: the process had already exited"
    return f"{folder.name}: stop requested (SIGINT to pid {state.pid}); it saves a checkpoint after this step"
