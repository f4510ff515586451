"""The pieces that make several processes train as one: shared step randomness, the start lines, the
shipped `accelerate config` files. (The launches themselves are in test_distributed.py.)"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from finetune.rng import shared_step_generator, step_generator
from finetune.train.loss import sample_noise, sample_timesteps
from finetune.train.step import batch_latents

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[3]


def draws(generator, batch: int) -> list[torch.Tensor]:
    """Every random draw of a step, in the step's order: latent sample, noise (with offset), timesteps."""
    mean = torch.zeros(batch, 4, 8, 8)
    latents = batch_latents({"latents_mean": mean, "latents_std": torch.ones_like(mean)}, None, generator)
    noise = sample_noise(latents, generator, noise_offset=0.1, random_strength=True)
    return [latents, noise, sample_timesteps(batch, 1000, generator, CPU)]


def test_n_processes_draw_what_one_process_draws_for_the_global_batch():
    one = draws(shared_step_generator(3, 1, 5, (0, 4), CPU), 4)
    # Processes of 1, 2 and 1 rows (an uneven remainder) each keep their own rows of the same draws.
    parts = [draws(shared_step_generator(3, 1, 5, (offset, 4), CPU), size) for offset, size in ((0, 1), (1, 2), (3, 1))]
    for i, whole in enumerate(one):
        assert torch.equal(torch.cat([p[i] for p in parts]), whole)
    # One process draws what it drew before the generator was shared (pinned losses stay pinned).
    before = draws(step_generator(3, 1, 5, 0, CPU), 4)
    assert all(torch.equal(a, b) for a, b in zip(one, before))
    with pytest.raises(ValueError, match="does not match the sampler"):
        draws(shared_step_generator(3, 1, 5, (3, 4), CPU), 2)


def fake_accelerator(world: int, rank: int, kind: str):
    return SimpleNamespace(num_processes=world, process_index=rank, local_process_index=rank % 2,
                           device=CPU, distributed_type=SimpleNamespace(value=kind),
                           state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=2)))


def test_start_lines_name_processes_machines_and_the_distributed_type(monkeypatch):
    from finetune.train.distributed import topology_lines

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    run, mine = topology_lines(fake_accelerator(4, 3, "FSDP"), "bf16")
    assert run.startswith("processes: 4 (cpu, FSDP) = 2 machines x 2; FSDP2: the UNet's weights")
    assert run.endswith("mixed precision: bf16")
    assert mine.startswith("rank 3 of 4: machine 1 of 2 (") and mine.endswith("local rank 1, device cpu")
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    run, mine = topology_lines(fake_accelerator(1, 0, "NO"), "no")
    assert run.startswith("processes: 1 (cpu, NO) = 1 machine x 1; one process") and mine is None


@pytest.mark.parametrize("name", ["ddp-1-machine.yaml", "fsdp-1-machine.yaml", "ddp-2-machines.yaml"])
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "docs" / "accelerate" / name))
    assert config.use_cpu is False and config.dynamo_config == {"dynamo_backend": "NO"}
    if config.distributed_type.value == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2  # check_parallelism refuses FSDP1
    assert config.num_processes % config.num_machines == 0


def test_a_resume_with_another_process_count_is_refused_before_any_work(tmp_path):
    from finetune.errors import CheckpointError
    from finetune.train.checkpoint import TrainState
    from finetune.train.resume import ResumePoint, check_process_count

    point = ResumePoint(tmp_path, TrainState(num_processes=2), {})
    check_process_count(point, 2)
    for now in (1, 4):
        with pytest.raises(CheckpointError, match=f"processes: 2 in the checkpoint, {now} now .*--num_processes 2"):
            check_process_count(point, now)


def test_fsdp_on_cpu_turns_only_an_fsdp_launch_into_fsdp(monkeypatch):
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    from finetune.train.distributed import fsdp_on_cpu

    monkeypatch.setitem(PartialState._shared_state, "distributed_type", DistributedType.MULTI_CPU)  # restored after
    state = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, mixed_precision="no", fsdp_plugin=None)
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    fsdp_on_cpu(SimpleNamespace(state=state))
    assert state.distributed_type == DistributedType.MULTI_CPU and state.fsdp_plugin is None  # --multi_gpu: DDP
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    fsdp_on_cpu(SimpleNamespace(state=state))
    assert state.distributed_type == DistributedType.FSDP and state.fsdp_plugin.fsdp_version == 2
    assert PartialState._shared_state["distributed_type"] == DistributedType.FSDP
