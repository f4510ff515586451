"""`scripts/benchmark.py --tiny` runs on the CPU and prints one JSON row per profile and data stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_benchmark_prints_json_rows():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--tiny", "--planning-images", "300",
                           "--cache-images", "4"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert rows[0]["benchmark"]["device"] == "cpu"
    profiles = {r["profile"]: r for r in rows if "profile" in r}
    assert set(profiles) == {"baseline", "fast", "balanced", "low_vram", "min_vram", "full"}
    for row in profiles.values():
        assert row["step_ms"] > 0 and row["tflop_per_step"] > 0 and row["ratio_vs_baseline"] > 0
        assert {"peak_allocated_gib", "peak_reserved_gib", "tflops", "mfu"} <= set(row)
    assert profiles["baseline"]["ratio_vs_baseline"] == 1.0
    # checkpointing recomputes the forward: more FLOPs per step than without
    assert profiles["low_vram"]["tflop_per_step"] > profiles["balanced"]["tflop_per_step"]
    data = {r["row"]: r for r in rows if "row" in r}
    assert data["bucket_planning"]["images"] == 300 and data["bucket_planning"]["replan_images_per_s"] > 0
    assert data["latent_cache_build"]["images"] == 4 and data["latent_cache_build"]["images_per_s"] > 0
