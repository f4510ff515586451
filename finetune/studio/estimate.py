"""The pre-flight memory estimate for a config on a card of a given size, as `finetune train` prints it.

The estimate itself is `finetune.train.estimate.config_peak_gib` (a meta-device UNet: no weights, no GPU).
"""

from __future__ import annotations

from finetune.errors import ConfigError
from finetune.train.estimate import config_peak_gib

CARD_SIZES_GIB = (8, 12, 16, 24)


def preflight(cfg, card_gib: float) -> str:
    """Which memory profile applies on a card with `card_gib` free, and the estimated peak, as Markdown."""
    from finetune.memory.profiles import apply_memory_profile  # imports torch: only when an estimate runs

    try:
        resolved, message = apply_memory_profile(cfg, free_gib=float(card_gib))
    except ConfigError as err:
        return f"**memory profile**: {err}"
    training = resolved.training
    try:
        gib = config_peak_gib(resolved)
    except Exception as err:  # noqa: BLE001 - e.g. nf4 needs real tensors; the page says why, not crash
        return f"{message or 'memory profile: custom'}\n\nno estimate for these settings: {err}"
    verdict = "fits" if gib <= card_gib else "**does not fit**"
    amount = f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.0f} MiB"  # the tiny model needs MiBs
    lines = [f"**estimated peak GPU memory: {amount}** on a {card_gib:g} GiB card: {verdict} "
             f"(at {resolved.dataset.resolution}², batch {training.batch_size})",
             message or "memory profile: custom (the config's own keys)"]
    return "\n\n".join(lines)
