"""One adapted module as read from a file (LoRA, DoRA, LoHa, LoKr) and the weight change it makes.

Scales follow the readers of these files (ComfyUI, LyCORIS, diffusers): LoRA and LoHa scale by
alpha / rank; LoKr by alpha / rank only when one of its Kronecker factors is itself low-rank, else
by 1 (LyCORIS writes alpha = rank there). Every delta is computed in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.errors import ModelError


@dataclass
class LoraModule:
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float
    # DoRA magnitude: (out, 1[, 1, 1]) or (out,) normalises each output row of W + ΔW (peft, LyCORIS
    # wd_on_out); (1, in[, 1, 1]) normalises each input column (LyCORIS' other axis).
    dora_scale: torch.Tensor | None = None

    kind = "lora"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Shape of the weight this module changes (conv: (out, in, kh, kw))."""
        return (self.up.shape[0], *self.down.shape[1:])

    def low_rank_delta(self, scale: float = 1.0) -> torch.Tensor:
        """scale · (alpha / rank) · up @ down, shaped like the target weight."""
        product = self.up.float().flatten(1) @ self.down.float().flatten(1)  # (out, in·kh·kw)
        return product.reshape(self.out_shape) * (scale * self.alpha / self.rank)

    def delta(self, scale: float = 1.0, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Change to the target weight at strength `scale`; DoRA needs the base `weight` (its norm)."""
        if self.dora_scale is None:
            return self.low_rank_delta(scale)
        if weight is None:
            raise ModelError("a DoRA module's change depends on the base weight: pass weight=")
        base = weight.float().reshape(self.out_shape)
        return scale * (dora_weight(base, self.low_rank_delta(), self.dora_scale) - base)


def dora_weight(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """magnitude · (W + ΔW) / ‖W + ΔW‖, the norm taken per output row or per input column."""
    combined = base + delta
    out = combined.shape[0]
    magnitude = magnitude.float()
    if magnitude.dim() == 1 or (magnitude.shape[0] == out and magnitude.shape[1] == 1):
        norm = combined.flatten(1).norm(dim=1)  # (out,)
        factor = (magnitude.flatten() / norm).reshape(out, *[1] * (combined.dim() - 1))
    else:
        norm = combined.transpose(0, 1).flatten(1).norm(dim=1)  # (in,)
        factor = (magnitude.flatten() / norm).reshape(1, -1, *[1] * (combined.dim() - 2))
    return combined * factor


@dataclass
class LohaModule:
    """Hadamard product of two low-rank products: ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / rank."""

    w1_a: torch.Tensor  # (out, rank)
    w1_b: torch.Tensor  # (rank, in·kh·kw)
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float
    kernel: tuple[int, ...] = ()  # (kh, kw) for convs, from the target layer or the file's use

    kind = "loha"

    @property
    def rank(self) -> int:
        return self.w1_b.shape[0]

    @property
    def out_shape(self) -> tuple[int, ...]:
        # Conv factors are stored flattened (rank, in·kh·kw): the kernel comes from the target layer.
        if not self.kernel:
            return (self.w1_a.shape[0], self.w1_b.shape[1])
        return (self.w1_a.shape[0], self.w1_b.shape[1] // (self.kernel[0] * self.kernel[1]), *self.kernel)

    def delta(self, scale: float = 1.0, weight: torch.Tensor | None = None) -> torch.Tensor:
        m1 = self.w1_a.float() @ self.w1_b.float()
        m2 = self.w2_a.float() @ self.w2_b.float()
        shape = tuple(weight.shape) if weight is not None else self.out_shape
        return (m1 * m2).reshape(shape) * (scale * self.alpha / self.rank)


@dataclass
class LokrModule:
    """Kronecker product ΔW = w1 ⊗ w2 (either factor may be stored as a low-rank pair)."""

    tensors: dict[str, torch.Tensor]  # lokr_w1 | lokr_w1_a + lokr_w1_b, lokr_w2 | lokr_w2_a + lokr_w2_b
    alpha: float

    kind = "lokr"

    @property
    def rank(self) -> int | None:
        """The rank of the low-rank factor, None when both factors are full (then the scale is 1)."""
        for key in ("lokr_w2_b", "lokr_w1_b"):
            if key in self.tensors:
                return self.tensors[key].shape[0]
        return None

    def factor(self, which: str) -> torch.Tensor:
        full = self.tensors.get(f"lokr_{which}")
        if full is not None:
            return full.float()
        return self.tensors[f"lokr_{which}_a"].float() @ self.tensors[f"lokr_{which}_b"].float()

    @property
    def out_shape(self) -> tuple[int, ...]:
        w1, w2 = self.factor("w1"), self.factor("w2")
        if w2.dim() == 4:
            return (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])
        return (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1])

    def delta(self, scale: float = 1.0, weight: torch.Tensor | None = None) -> torch.Tensor:
        w1, w2 = self.factor("w1"), self.factor("w2")
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        product = torch.kron(w1, w2)
        strength = scale * (self.alpha / self.rank if self.rank is not None else 1.0)
        shape = tuple(weight.shape) if weight is not None else tuple(product.shape)
        return product.reshape(shape) * strength


AdapterModule = LoraModule | LohaModule | LokrModule
