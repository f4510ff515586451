"""Keyed random generators: the same key always draws the same numbers, whatever the global RNG did."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch


def keyed_generator(key: str, device: torch.device) -> torch.Generator:
    """A generator seeded by a hash of `key`."""
    return torch.Generator(device=device).manual_seed(_seed_of(key))


def _seed_of(key: str) -> int:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def step_generator(seed: int, epoch: int, batch: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator owned by one micro-batch (epoch, batch index) of one process.

    Noise, timesteps and latent sampling draw only from it, so a resumed run draws exactly what the
    uninterrupted run drew.
    """
    return keyed_generator(f"{seed}:{epoch}:{batch}:{rank}", device)


class SharedStepGenerator(torch.Generator):
    """A micro-step's generator shared by all processes: it draws for the step's whole batch.

    `rows` = (offset, total): this process's batch is rows offset.. of the `total` rows that all
    processes train on in this micro-step. Every draw covers `total` rows and each process keeps its
    own, so N processes with batch B draw exactly what one process with batch N·B draws: the
    process count changes how the work is split, not the noise or the timesteps.
    """

    rows: tuple[int, int]


def shared_step_generator(seed: int, epoch: int, batch: int, rows: tuple[int, int],
                          device: torch.device) -> SharedStepGenerator:
    """The generator of micro-batch (epoch, batch) for the process holding `rows` = (offset, total).

    Keyed as rank 0's `step_generator`, so a one-process run draws what it always drew.
    """
    generator = SharedStepGenerator(device=device)
    generator.manual_seed(_seed_of(f"{seed}:{epoch}:{batch}:0"))
    generator.rows = rows
    return generator


def draw_rows(draw: Callable[[int], torch.Tensor], batch_size: int, generator: torch.Generator | None) -> torch.Tensor:
    """`draw(n)` draws n rows; this process's `batch_size` rows of them (all n with a plain generator)."""
    rows = getattr(generator, "rows", None)
    if rows is None:
        return draw(batch_size)
    offset, total = rows
    if offset + batch_size > total:
        raise ValueError(f"rows {offset}..{offset + batch_size} of a step of {total}: the batch does not match the sampler")
    return draw(total)[offset:offset + batch_size]
