"""Several processes on the CPU (gloo): FSDP2 full fine-tuning and DDP LoRA, launched as a user would.

Each `accelerate launch` of two processes costs ~20-25 s of wall time on 2 idle cores (imports, model,
caches, a few steps), so there are three launches in all, each carrying many checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainer_runs import adapter_tensors, write_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]


def launch(accelerate_config: str, config: Path, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` with a file of docs/accelerate/ on 2 processes, `-m finetune train CONFIG ARGS`,
    on this checkout; fails the test on a non-zero exit."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "docs" / "accelerate" / accelerate_config), "--num_processes", "2", "--mixed_precision", "no",
           "-m", "finetune", "train", str(config), *args]
    # The children import this checkout, not whichever `finetune` is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=config.parent)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return {row["step"]: row["loss"] for row in map(json.loads, lines) if "loss" in row}


def test_fsdp2_on_cpu_shards_resumes_bitwise_and_writes_the_whole_unet(tmp_path, tiny_model_dir, shapes_folder):
    from diffusers import UNet2DConditionModel

    from finetune.models.sgm_keys import unet_state_dict_to_sgm

    path = write_config(tmp_path, tiny_model_dir, shapes_folder, steps=2, every=1)
    full = ["--set", "training.method=full", "--set", "training.learning_rate=1e-4", "--set", "logging.every_n_steps=1"]
    done = launch("fsdp-1-machine.yaml", path, *full)
    assert "processes: 2 (cpu:0, FSDP) = 1 machine x 2; FSDP2" in done.stdout  # not DDP in disguise
    assert "barrier timeout 6 h" in done.stdout
    assert done.stdout.count("done: step 2") == 1  # one summary, from the main process
    out = tmp_path / "out"
    step1, step2 = out / "checkpoints" / "step-000001", out / "checkpoints" / "step-000002"
    # A sharded checkpoint: each process wrote its own part of the weights and of the optimizer state.
    assert sorted(p.name for p in (step1 / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert len(list((step1 / "optimizer_0").glob("*.distcp"))) == 2
    whole = adapter_tensors(out / "lora.safetensors")
    whole_losses = losses(out)

    # The whole UNet, gathered from the shards and written once by the main process, in SGM keys.
    base = unet_state_dict_to_sgm(UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").state_dict(),
                                  dict(UNet2DConditionModel.load_config(tiny_model_dir / "unet")))
    assert {k: v.shape for k, v in whole.items()} == {f"model.diffusion_model.{k}": v.shape for k, v in base.items()}
    assert any(not torch.equal(whole[f"model.diffusion_model.{k}"], v.half()) for k, v in base.items())

    # What a kill -9 inside step 2's save leaves on disk: step 1 complete and named by `latest`, step 2
    # a temp folder without train_state.json, no final weights. (A checkpoint is renamed into place
    # only once complete, so no other state is possible.)
    os.replace(step2, out / "checkpoints" / ".step-000002.tmp")
    (out / "checkpoints" / ".step-000002.tmp" / "train_state.json").unlink()
    (out / "checkpoints" / "latest").write_text("step-000001")
    (out / "lora.safetensors").unlink()
    (out / "logs" / "metrics.jsonl").unlink()

    resumed = launch("fsdp-1-machine.yaml", path, *full, "--resume")
    assert f"resumed from {step1}" in resumed.stdout
    again = adapter_tensors(out / "lora.safetensors")
    assert again.keys() == whole.keys() and all(torch.equal(again[k], whole[k]) for k in whole)
    assert losses(out) == {2: whole_losses[2]}
    assert not (out / "checkpoints" / ".step-000002.tmp").exists()  # the half-written save was pruned


def shares_per_rank(cache_dir: Path) -> dict[str, int]:
    """Entries each process encoded, read from the index: shard names end in -r<rank>-NNNNN."""
    shards = json.loads((cache_dir / "index.json").read_text())["shards"]
    counts: dict[str, int] = {}
    for name, record in shards.items():
        rank = name.rsplit("-", 2)[1]
        counts[rank] = counts.get(rank, 0) + len(record["entries"])
    return counts


def test_ddp_two_processes_train_as_one_with_the_global_batch(tmp_path, tiny_model_dir, shapes_folder):
    from finetune.config import load_config
    from finetune.errors import CheckpointError
    from finetune.train.recipe import train

    # Two processes x batch 1 against one process x batch 2: the same rows, noise and timesteps per step.
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    # Adam divides by |gradient|: where a gradient is ~0, the rounding of DDP's all-reduce (1e-8) turns
    # into a whole learning-rate step of either sign. A larger eps bounds that, so the comparison sees
    # the math (with eps = 1e-8: 40 of 117k weights off by up to 1.5e-4, the median 1.5e-8).
    common = ["training.max_steps=3", "output.save_dtype=fp32", "optimizer.eps=1e-3"]
    path = write_config(two, tiny_model_dir, shapes_folder, steps=3, every=2)
    done = launch("ddp-1-machine.yaml", path, *[a for o in common + ["training.batch_size=1"] for a in ("--set", o)])
    assert "processes: 2 (cpu:0, MULTI_CPU) = 1 machine x 2; DDP" in done.stdout  # one gloo group, not two lone ranks
    assert "rank 1 of 2: machine 0 of 1" in done.stdout and "barrier timeout 6 h" in done.stdout
    assert done.stdout.count("done: step 3") == 1  # the summary prints once, not once per process
    state = json.loads((two / "out" / "checkpoints" / "step-000003" / "train_state.json").read_text())
    assert state["num_processes"] == 2 and state["images_seen"] == 3 * 2
    saved = {p.name for p in (two / "out" / "checkpoints" / "step-000003").iterdir()}
    assert {"rng_0.safetensors", "rng_1.safetensors", "training_state.safetensors", "files.json"} <= saved
    assert not [name for name in saved if name.endswith((".pkl", ".bin", ".pt"))]  # DDP: no pickle either
    # Each process encoded its own share of the caches, and nothing twice (4 images, 4 captions + "").
    assert shares_per_rank(two / "out" / "cache" / "latents") == {"r0": 2, "r1": 2}
    assert shares_per_rank(two / "out" / "cache" / "text") == {"r0": 3, "r1": 2}

    single = train(load_config(write_config(one, tiny_model_dir, shapes_folder, steps=3, every=2),
                               common + ["training.batch_size=2"]), progress=False)
    a, b = adapter_tensors(two / "out" / "lora.safetensors"), adapter_tensors(single.output_path)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert any(a[k].abs().sum() > 0 for k in a if k.endswith(".lora_up.weight"))  # trained, not two zeros

    # Resuming the two-process checkpoint with one process would cut the data differently: refused.
    with pytest.raises(CheckpointError, match=r"processes: 2 in the checkpoint, 1 now.*--num_processes 2"):
        train(load_config(path, common + ["training.max_steps=4", "training.batch_size=1"]),
              resume="latest", progress=False)
