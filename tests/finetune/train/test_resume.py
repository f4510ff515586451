"""The resume point's checks that need no training run: the schedule note of a longer run."""

from __future__ import annotations

import math
from pathlib import Path

from finetune.config import OptimizerConfig, TrainingConfig
from finetune.train.checkpoint import TrainState
from finetune.train.resume import ResumePoint, schedule_change


def point(step: int, max_steps: int) -> ResumePoint:
    return ResumePoint(Path("ckpt"), TrainState(step=step), {"training": {"max_steps": max_steps}})


def test_a_longer_cosine_run_says_what_the_learning_rate_does_next():
    cosine = OptimizerConfig(scheduler="cosine")
    note = schedule_change(point(6, 6), TrainingConfig(max_steps=12, learning_rate=1e-3), cosine)
    # Step 7 of a 12-step cosine: half of the cycle's 6/12 point, (1 + cos(pi/2)) / 2 = 0.5.
    expected = 1e-3 * 0.5 * (1 + math.cos(math.pi * 6 / 12))
    assert note == ("training.max_steps: 6 in the checkpoint, 12 now: the cosine schedule is recomputed over 12 "
                    f"steps; the learning rate at step 7 is {expected:.3g} (the old schedule's was 0)")


def test_the_same_length_or_a_constant_schedule_needs_no_note():
    assert schedule_change(point(6, 12), TrainingConfig(max_steps=12), OptimizerConfig(scheduler="cosine")) is None
    assert schedule_change(point(6, 6), TrainingConfig(max_steps=12), OptimizerConfig(scheduler="constant")) is None
