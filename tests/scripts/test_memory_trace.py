"""`scripts/memory_trace.py`: the fake-tensor trace counts what real tensors hold, and the pre-flight estimate follows it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import memory_trace  # noqa: E402
from benchmark import build_unet, flop_counter, toolkit_settings  # noqa: E402


def test_live_bytes_counts_each_storage_once_until_its_last_reference_goes():
    tracker = memory_trace.LiveBytes()
    with tracker:
        a = torch.zeros(1024)  # 4 KiB
        view = a.view(2, 512)  # the same storage: no new bytes
        b = a + 1  # 4 KiB more
        assert tracker.current == 8192
        del a
        assert tracker.current == 8192  # the view still holds a's storage
        del view
        assert tracker.current == 4096
        b.add_(1)  # in place: nothing new
    assert (tracker.current, tracker.peak) == (4096, 8192)


def test_cuda_autocast_rules_put_norms_in_fp32_only_while_active():
    x = torch.randn(1, 8, 4, 4, dtype=torch.bfloat16)
    with memory_trace.cuda_autocast_rules(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.group_norm(x, 4).dtype == torch.float32
        assert torch.nn.functional.layer_norm(x, (4,)).dtype == torch.float32
        assert torch.nn.functional.linear(x.float(), torch.ones(3, 4)).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.group_norm(x, 4).dtype == torch.bfloat16  # the CPU's own rule again


def test_flop_counter_counts_cpu_flash_attention():
    q = k = v = torch.randn(1, 2, 16, 8)  # (batch, heads, tokens, head dim)
    with flop_counter() as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 1 * 2 * 16 * 16 * 8)  # q·kᵀ and attention·v


def _args(**overrides):
    args = SimpleNamespace(tiny=True, rank=4, resolution=128, batch_size=2, checkpointing=None, base_dtype=None,
                           compile_mode=None, no_compile=True, channels_last=False)
    return SimpleNamespace(**{**vars(args), **overrides})


# The profiles whose steps differ most (no recompute; per-block recompute; the fused full fine-tune).
# low_vram's full recompute is the transformer row's code path with every block; each row costs ~15 s.
@pytest.mark.parametrize(("profile", "checkpointing"), [("fast", None), ("low_vram", "transformer"), ("full", None)])
@pytest.mark.slow
def test_fake_trace_counts_what_real_tensors_hold(profile, checkpointing):
    """The same step on the tiny model, traced on fake tensors and run on real ones: the same peak and FLOPs."""
    from finetune.config import LoraConfig
    from finetune.train.builders import prepare_unet

    args = _args(checkpointing=checkpointing)
    traced = {}
    for fake in (True, False):
        training, memory, optim = toolkit_settings(profile, args)
        optim.name = "adamw"  # bitsandbytes cannot run on fake tensors (the script corrects its state bytes)
        device = torch.device("meta" if fake else "cpu")
        unet = build_unet(tiny=True, device=device)
        prepare_unet(unet, training, memory, LoraConfig(rank=args.rank, alpha=args.rank, targets="attn"), device=device)
        traced[fake] = memory_trace.trace_prepared(unet, training, memory, optim, args, fake=fake)
    fake, real = traced[True], traced[False]
    assert fake["weights"] == real["weights"] and fake["state"] == real["state"] and fake["flops"] == real["flops"]
    assert fake["peak"] == pytest.approx(real["peak"], rel=0.01)
    assert real["peak"] > real["weights"] + real["state"]  # the step's activations were seen


def test_bnb_state_bytes_are_8_bit_for_large_tensors_only():
    small, large = torch.empty(100), torch.empty(4096)
    assert memory_trace.bnb_state_bytes([small], "adamw8bit") == 2 * 4 * 100
    assert memory_trace.bnb_state_bytes([large], "adamw8bit") == 2 * (4096 + 4 * 16)
    assert memory_trace.bnb_state_bytes([large], "lion8bit") == 4096 + 4 * 16


@pytest.mark.slow
def test_preflight_estimate_follows_the_sdxl_trace():
    """The printed estimate for SDXL at 1024² stays within 15 % of the traced peak for the LoRA row whose
    activations weigh most (no checkpointing). (The full fine-tune's and low_vram's rows are in
    docs/benchmarks.md; each SDXL trace costs ~50 s of the suite, which has a 15-minute budget.)"""
    args = _args(tiny=False, rank=16, resolution=1024, batch_size=1, no_compile=False)
    for profile in ("fast",):
        row = memory_trace.trace_row(profile, args)
        assert row["estimate_gib"] == pytest.approx(row["traced_peak_gib"], rel=0.15), row


@pytest.mark.slow
def test_script_prints_json_rows():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "memory_trace.py"), "--tiny", "--profile", "low_vram"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    header, row = (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))
    assert header["memory_trace"]["model"] == "tiny"
    assert row["profile"] == "low_vram" and row["checkpointing"] == "full" and row["optimizer"] == "adamw8bit"
    assert row["traced_peak_gib"] > row["weights_gib"] > 0 and row["tflop_per_step"] > 0
    assert "traced as AdamW" in row["note"]


@pytest.mark.gpu
@pytest.mark.parametrize("profile", ["fast", "low_vram", "full"])
def test_trace_matches_what_the_cuda_allocator_holds(profile):
    """The trace stands in for `torch.cuda.max_memory_allocated`: the same step on a GPU peaks within 10 %."""
    from finetune.config import LoraConfig
    from finetune.train.builders import prepare_unet

    # 512², batch 4: activations of a few hundred MiB, so cuBLAS workspaces are noise
    args = _args(resolution=512, batch_size=4, compile_cache=None)
    peaks = {}
    for device in (torch.device("cuda"), torch.device("meta")):
        training, memory, optim = toolkit_settings(profile, args)
        optim.name = "adamw"  # as the trace runs it (it corrects bitsandbytes' state bytes afterwards)
        unet = build_unet(tiny=True, device=device)
        params = prepare_unet(unet, training, memory, LoraConfig(rank=args.rank, alpha=args.rank, targets="attn"), device=device)
        if device.type == "meta":
            peaks["traced"] = memory_trace.trace_prepared(unet, training, memory, optim, args)["peak"]
            continue
        step, _ = memory_trace.make_toolkit_step(unet, params, training, memory, optim, args, device)
        step()  # the optimizer state exists from here on, as in the trace's second step
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peaks["cuda"] = torch.cuda.max_memory_allocated()
        del unet, params, step
        torch.cuda.empty_cache()
    assert peaks["traced"] == pytest.approx(peaks["cuda"], rel=0.10), peaks
