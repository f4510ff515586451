"""Keyed random generators: the same key always draws the same numbers, whatever the global RNG did."""

from __future__ import annotations

import hashlib

import torch


def keyed_generator(key: str, device: torch.device) -> torch.Generator:
    """A generator seeded by a hash of `key`."""
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def step_generator(seed: int, epoch: int, batch: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator owned by one micro-batch (epoch, batch index) of one process.

    Noise, timesteps and latent sampling draw only from it, so a resumed run draws exactly what the
    uninterrupted run drew.
    """
    return keyed_generator(f"{seed}:{epoch}:{batch}:{rank}", device)
