"""`scripts/benchmark.py --tiny` runs on the CPU and prints one JSON row per profile and data stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402


@pytest.mark.slow
def test_tiny_benchmark_prints_json_rows():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--tiny", "--planning-images", "300",
                           "--cache-images", "4"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert rows[0]["benchmark"]["device"] == "cpu"
    # every figure names the code and the exact command that measured it
    assert rows[0]["benchmark"]["command"].startswith("python ") and "--tiny" in rows[0]["benchmark"]["command"]
    assert len(rows[0]["benchmark"]["commit"].split("-")[0]) == 40
    profiles = {r["profile"]: r for r in rows if "profile" in r}
    assert set(profiles) == {"baseline", "fast", "balanced", "low_vram", "min_vram", "full"}
    for row in profiles.values():
        assert row["step_ms"] > 0 and row["tflop_per_step"] > 0 and row["ratio_vs_baseline"] > 0
        assert {"peak_allocated_gib", "peak_reserved_gib", "tflops", "mfu"} <= set(row)
    assert profiles["baseline"]["ratio_vs_baseline"] == 1.0
    # checkpointing recomputes the forward: more FLOPs per step than without
    assert profiles["low_vram"]["tflop_per_step"] > profiles["balanced"]["tflop_per_step"]
    # each row runs the settings its profile names
    assert profiles["min_vram"]["base_dtype"] == "nf4" and profiles["low_vram"]["checkpointing"] == "full"
    assert profiles["full"]["fused_backward"] and profiles["full"]["weight_dtype"] == "bf16"
    data = {r["row"]: r for r in rows if "row" in r}
    assert data["bucket_planning"]["images"] == 300 and data["bucket_planning"]["replan_images_per_s"] > 0
    assert data["latent_cache_build"]["images"] == 4 and data["latent_cache_build"]["images_per_s"] > 0


@pytest.mark.slow
def test_tiny_benchmark_overrides_checkpointing_and_base_precision():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--tiny", "--no-data",
                           "--profile", "low_vram", "--checkpointing", "offload", "--base-dtype", "fp8", "--trace"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.splitlines()[-1])
    assert (row["profile"], row["checkpointing"], row["base_dtype"]) == ("low_vram", "offload", "fp8")
    assert row["step_ms"] > 0
    assert row["trace"]["top_ops_ms_per_step"] and all(v >= 0 for v in row["trace"]["top_ops_ms_per_step"].values())


def test_toolkit_rows_time_the_recipes_own_micro_step_and_optimizer_step(monkeypatch):
    from finetune.train.recipe import Recipe

    calls = []
    for name in ("micro_step", "optimizer_step"):
        def counted(self, *args, _name=name, _method=getattr(Recipe, name)):
            calls.append(_name)
            return _method(self, *args)
        monkeypatch.setattr(Recipe, name, counted)
    args = benchmark.parse_args(["--tiny", "--resolution", "64", "--no-data"])
    device = torch.device("cpu")
    unet = benchmark.build_unet(True, device)
    step, _, settings = benchmark.toolkit_step("balanced", unet, args, device)
    ups = [p for name, p in unet.named_parameters() if "lora_B" in name]
    assert ups and not any(p.any() for p in ups)  # LoRA starts as a no-op
    step()
    step()
    assert calls == ["micro_step", "optimizer_step"] * 2
    assert any(p.any() for p in ups)  # the recipe's optimizer step moved the adapter
    assert settings["checkpointing"] == "transformer"  # the row runs its profile's settings
