"""Precision names as the config spells them (`fp32`, `bf16`, `fp16`) and the torch dtypes they mean."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
