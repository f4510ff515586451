"""The optimizer step fused into backward, and bf16 weights updated with stochastic rounding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from finetune.rng import keyed_generator

# bf16 is the high half of fp32; clearing the low 16 bits of an fp32 value leaves a bf16 value exactly.
_HIGH_HALF = -(1 << 16)  # 0xFFFF0000 as an int32


def stochastic_round_(target_bf16: torch.Tensor, source_fp32: torch.Tensor, generator: torch.Generator) -> None:
    """Write `source_fp32` into `target_bf16`, rounding each value up or down at random.

    A value a fraction f of the way from its lower bf16 neighbour (in magnitude) to the next rounds up
    with probability f, so the result equals the source on average: updates far below bf16's resolution
    (8 bits of mantissa, a step of 2^-7 at 1.0) still move the weights. Values already representable in
    bf16 are copied exactly. The same generator state gives the same result.
    """
    if target_bf16.dtype != torch.bfloat16 or source_fp32.dtype != torch.float32:
        raise TypeError(f"stochastic_round_ writes float32 into bfloat16, got {source_fp32.dtype} into "
                        f"{target_bf16.dtype}")
    if target_bf16.shape != source_fp32.shape:
        raise ValueError(f"shapes differ: target {tuple(target_bf16.shape)}, source {tuple(source_fp32.shape)}")
    # Uniform bits below the kept half, added to the fp32 bit pattern, carry into the kept half with
    # probability (dropped bits) / 2^16; then truncate. Sign-magnitude: the same holds for negatives.
    bits = torch.randint(0, 1 << 16, source_fp32.shape, dtype=torch.int32, generator=generator,
                         device=source_fp32.device)
    bits.add_(source_fp32.view(torch.int32)).bitwise_and_(_HIGH_HALF)
    target_bf16.copy_(bits.view(torch.float32))  # exact: the low half is zero


def _rounding_generator(seed: int, update: int, index: int, device: torch.device) -> torch.Generator:
    """The generator for one update of one parameter; a resumed run rebuilds it from the same three numbers."""
    return keyed_generator(f"stochastic-rounding:{seed}:{update}:{index}", device)


def _released(device: torch.device) -> torch.Tensor:
    # Zero elements but the right dtype and device: load_state_dict casts state to these.
    return torch.empty(0, dtype=torch.float32, device=device)


@dataclass
class _Slot:
    """One trained tensor, the optimizer that owns its state and, when rounding stochastically, its fp32 stand-in."""

    index: int
    param: torch.nn.Parameter
    optimizer: torch.optim.Optimizer
    scratch: torch.nn.Parameter | None
    updates: int = 0  # keys the rounding bits; part of the saved state


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """One inner optimizer per parameter, stepped from that parameter's post-accumulate-grad hook.

    Each gradient is (optionally) clipped, applied and freed as soon as backward completes it, so the
    whole model's gradients never exist at once. `step()` and `zero_grad()` do nothing; the work happens
    in `loss.backward()`. So there is no gradient accumulation: every backward is an optimizer step.

    `param_groups` are the inner optimizers' own group dicts (one per parameter, in parameter order), so
    an LR scheduler built on this wrapper sets the LR each inner optimizer uses. They hold the tensors the
    inner optimizers step (a bf16 parameter's fp32 stand-in, see below); the optimizer state lives in
    `optimizers`, not in this wrapper's own `state`.

    Build it once the model is on its device and in its training dtype: the stand-ins are made for the
    bf16 tensors present then, on their device, and CUDA tensors let AdamW pick its fused kernel.

    With `stochastic_rounding`, a bf16 parameter has no fp32 master copy. Its inner optimizer is built
    over an fp32 scratch Parameter that holds data only inside the hook: the bf16 weight and gradient are
    copied into it, the optimizer steps it (its state stays fp32 and keyed to a tensor that never
    changes identity or dtype), the result is rounded stochastically back into the weight, and the
    scratch storage is released. Transient fp32 memory is therefore one tensor's, never the model's.
    Other dtypes are stepped in place, as without the option.

    Args:
        param_groups: torch param groups ({"params": [...], "lr": ..., ...}).
        build_optimizer: builds an optimizer over a list of groups; called once per parameter with one
            group holding that one tensor and its group's options.
        max_grad_norm: clip each tensor's gradient to this L2 norm (0: no clipping). Per tensor, not
            global: the global norm needs every gradient at once, which is what this class avoids.
        stochastic_rounding: update bf16 parameters in fp32 and round stochastically (see above).
        seed: with each parameter's update count and index, keys the rounding bits, so a resumed run
            draws the bits the uninterrupted run would have.
    """

    def __init__(self, param_groups: list[dict], build_optimizer: Callable[[list[dict]], torch.optim.Optimizer], *,
                 max_grad_norm: float = 0.0, stochastic_rounding: bool = False, seed: int = 0) -> None:
        params = [p for group in param_groups for p in group["params"]]
        frozen = [i for i, p in enumerate(params) if not p.requires_grad]
        if frozen:
            raise ValueError(f"parameters {frozen[:5]} do not require grad; pass only trained parameters")
        # The base class checks leaves and duplicates and sets up its hook tables; its groups are replaced below.
        super().__init__(params, defaults={})
        self.max_grad_norm, self.stochastic_rounding, self.seed = max_grad_norm, stochastic_rounding, seed
        self._slots: list[_Slot] = []
        for group in param_groups:
            options = {k: v for k, v in group.items() if k != "params"}
            for param in group["params"]:
                scratch = None
                if stochastic_rounding and param.dtype == torch.bfloat16:
                    scratch = torch.nn.Parameter(_released(param.device))
                stepped = param if scratch is None else scratch
                optimizer = build_optimizer([{**options, "params": [stepped]}])
                self._slots.append(_Slot(len(self._slots), param, optimizer, scratch))
        self.defaults = dict(self._slots[0].optimizer.defaults)
        self.param_groups = [slot.optimizer.param_groups[0] for slot in self._slots]
        self._grad_norm_sq: torch.Tensor | None = None
        self._nonfinite: torch.Tensor | None = None
        self._handles = [slot.param.register_post_accumulate_grad_hook(self._hook_for(slot)) for slot in self._slots]

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, ...]:
        """The inner optimizers, in parameter order."""
        return tuple(slot.optimizer for slot in self._slots)

    def _hook_for(self, slot: _Slot) -> Callable[[torch.Tensor], None]:
        def hook(_param: torch.Tensor) -> None:
            self._update(slot)
        return hook

    @torch.no_grad()
    def _update(self, slot: _Slot) -> None:
        """Clip, step and free one parameter's gradient (through its fp32 stand-in when it has one)."""
        param, stepped = slot.param, slot.scratch
        if stepped is None:
            stepped = param
        else:
            stepped.data = param.detach().float()
            stepped.grad = param.grad.float()
            param.grad = None  # the bf16 gradient is no longer needed
        # A non-finite gradient cannot be skipped once its neighbours were applied: zero it (the step is
        # then momentum only for this tensor) and flag it, on the device, so no host sync happens here.
        bad = ~torch.isfinite(stepped.grad).all()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad.to(self._nonfinite.device)
        stepped.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        if self.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_([stepped], self.max_grad_norm)
            self._add_grad_norm(norm)
        slot.optimizer.step()
        stepped.grad = None  # freed now, before backward completes the next parameter's gradient
        if slot.scratch is not None:
            stochastic_round_(param, stepped, _rounding_generator(self.seed, slot.updates, slot.index, param.device))
            stepped.data = _released(param.device)
        slot.updates += 1

    def _add_grad_norm(self, norm: torch.Tensor) -> None:
        # Kept on the device: reading it would be a host sync per parameter.
        square = norm.detach().float().square()
        if self._grad_norm_sq is None:
            self._grad_norm_sq = square
        else:
            self._grad_norm_sq = self._grad_norm_sq + square.to(self._grad_norm_sq.device)

    def pop_grad_norm(self) -> torch.Tensor | None:
        """The global L2 norm of the gradients (before clipping) since the last call, for logging.

        None when `max_grad_norm` is 0 (no norms are computed) or no gradient arrived. It is only a
        report: by the time it is known every tensor has been updated.
        """
        total, self._grad_norm_sq = self._grad_norm_sq, None
        return None if total is None else total.sqrt()

    def pop_nonfinite(self) -> bool:
        """Whether any gradient since the last call was NaN/inf (it was zeroed before its update). One host sync."""
        flag, self._nonfinite = self._nonfinite, None
        return bool(flag) if flag is not None else False

    def step(self, closure: Callable[[], float] | None = None) -> None:
        """Nothing to do: each parameter was updated as backward completed its gradient."""
        if closure is not None:
            raise TypeError("FusedBackwardOptimizer steps during backward; step() takes no closure")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: each gradient was freed right after its update."""

    def state_dict(self) -> dict:
        """Every inner optimizer's state, plus the update counts and seed that key the rounding bits."""
        return {"optimizers": [slot.optimizer.state_dict() for slot in self._slots],
                "updates": [slot.updates for slot in self._slots],
                "seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what `state_dict` returned, so the next update is the uninterrupted run's, bit for bit.

        Raises:
            ValueError: the state is for a different number of parameters or a different seed.
        """
        saved = state_dict["optimizers"]
        if len(saved) != len(self._slots):
            raise ValueError(f"optimizer state holds {len(saved)} parameters, this optimizer has {len(self._slots)}")
        if state_dict["seed"] != self.seed:
            raise ValueError(f"optimizer state was saved with seed {state_dict['seed']}, this run has seed "
                             f"{self.seed}: the stochastic rounding would differ from the saved run")
        for slot, inner, updates in zip(self._slots, saved, state_dict["updates"]):
            slot.optimizer.load_state_dict(inner)
            slot.updates = int(updates)
        # Loading replaces each inner group dict; relink in place so a scheduler holding this list reaches them.
        self.param_groups[:] = [slot.optimizer.param_groups[0] for slot in self._slots]

    def remove(self) -> None:
        """Unregister the hooks: later backward passes leave gradients in `.grad` and update nothing."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __repr__(self) -> str:
        inner = type(self._slots[0].optimizer).__name__
        return (f"{type(self).__name__}({len(self._slots)} tensors, {inner} each, max_grad_norm={self.max_grad_norm}, "
                f"stochastic_rounding={self.stochastic_rounding})")
