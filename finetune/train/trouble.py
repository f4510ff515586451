"""When a run goes wrong (non-finite losses, out of memory): which checkpoint to continue from, and the
command that does it, printed so that the toolkit accepts it exactly as it stands.

Every command resumes through the run folder (`finetune train --resume FOLDER`, which reads the run's
own `config.resolved.toml`), so it works from any folder, whatever overrides started the run. Settings
that do not change the math already done (gradient checkpointing) resume as they are; the others carry
`--allow-changes`, which the resume check asks for.
"""

from __future__ import annotations

import math
import shlex
from pathlib import Path

from safetensors import safe_open

from finetune.train.checkpoint import list_checkpoints
from finetune.train.command import RESOLVED_CONFIG


def finite_checkpoint(checkpoints_dir: Path, before_step: int) -> Path | None:
    """The newest complete checkpoint saved at or before `before_step` whose weights are all finite."""
    for step, folder in reversed(list_checkpoints(checkpoints_dir)):
        if step <= before_step and _weights_finite(folder):
            return folder
    return None


def _weights_finite(folder: Path) -> bool:
    files = sorted(folder.glob("*.safetensors"))
    try:
        for path in files:
            with safe_open(str(path), framework="pt") as fh:
                for key in fh.keys():
                    tensor = fh.get_tensor(key)
                    if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                        return False
    except (OSError, RuntimeError, ValueError):  # unreadable: not a checkpoint to send anyone back to
        return False
    return bool(files)


def command(*words: str) -> str:
    return shlex.join(["finetune", "train", *words])


def nan_stop_message(*, streak: int, step: int, streak_start: int, run_dir: Path, learning_rate: float,
                     mixed_precision: str) -> str:
    """The NaN/inf stop: what happened, the newest good checkpoint (checked finite) and the command that
    continues from it with a tenth of the learning rate (or starts over when none is good)."""
    lower = _tenth(learning_rate)
    said = (f"loss was NaN/inf {streak} steps in a row at step {step} (the first at step {streak_start + 1}); "
            f"stopped. Every one of those steps was skipped (training.max_nan_steps); the weights are those of "
            f"step {step}.")
    precision = (" If it goes on, training.mixed_precision = 'bf16' does not overflow where fp16 does."
                 if mixed_precision == "fp16" else "")
    good = finite_checkpoint(run_dir / "checkpoints", streak_start)
    if good is not None:
        return (f"{said} The newest checkpoint from before the first non-finite loss, with finite weights, is "
                f"{good}. Continue from it with a lower learning rate (the change is recorded):\n  "
                + command("--resume", str(good), "--set", f"training.learning_rate={lower}", "--allow-changes")
                + precision)
    if list_checkpoints(run_dir / "checkpoints"):  # later checkpoints only: a fresh start must go elsewhere
        new_dir = run_dir.with_name(f"{run_dir.name}-lr{lower}")
        return (f"{said} No checkpoint saved before the first non-finite loss has finite weights. Start again "
                f"with a lower learning rate in a new folder:\n  "
                + command(str(run_dir / RESOLVED_CONFIG), "--set", f"training.learning_rate={lower}",
                          "--set", f"output.dir={new_dir}") + precision)
    return (f"{said} No checkpoint was saved yet. Start again with a lower learning rate:\n  "
            + command(str(run_dir / RESOLVED_CONFIG), "--set", f"training.learning_rate={lower}") + precision)


def _tenth(value: float) -> str:
    lower = value / 10
    exponent = math.floor(math.log10(lower))
    return f"{lower / 10**exponent:.3g}e{exponent}"


def out_of_memory_message(*, run_dir: Path, resume_from: Path | None, memory, training) -> str:
    """Out of memory in a training step: the checkpoint to continue from, the changes that keep the math
    first (resumed as they are), then a smaller batch with more accumulation (the same effective batch)."""
    saved = f"the run continues from {resume_from}" if resume_from else "no checkpoint was saved yet"
    resume = ["--resume", str(resume_from)] if resume_from else [str(run_dir / RESOLVED_CONFIG)]
    keep_math = (["--set", "memory.gradient_checkpointing=true"] if not memory.gradient_checkpointing
                 else ["--set", "memory.checkpointing_mode=offload"] if memory.checkpointing_mode != "offload" else [])
    lines = [f"out of GPU memory in a training step; {saved}."]
    if keep_math:
        what = keep_math[1].split("=")[0]
        lines.append(f"First, {what} saves activation memory and leaves the math as it is:\n  "
                     + command(*resume, *keep_math))
    if training.batch_size > 1:
        smaller = ["--set", f"training.batch_size={training.batch_size // 2}",
                   "--set", f"training.gradient_accumulation_steps={training.gradient_accumulation_steps * 2}"]
        allow = ["--allow-changes"] if resume_from else []
        lines.append("Or halve the batch and double the accumulation (the same images per optimizer step; "
                     "a resume records the change):\n  " + command(*resume, *keep_math, *smaller, *allow))
    lines.append("Other savers, each a config key: memory.profile = 'low_vram', memory.base_dtype = 'fp8' or 'nf4' "
                 "(LoRA), optimizer.name = 'adamw8bit' (those change the run: start it anew or resume with "
                 "--allow-changes).")
    return "\n".join(lines)
