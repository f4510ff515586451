"""Several processes as one run: the process group's timeout, FSDP on a CPU launch, and the start lines
that confirm the topology (ranks, machines, DDP or FSDP). docs/multi-gpu.md says how to launch."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

# How long a process waits at a barrier for the others. Rank 0 alone scans the dataset (and writes the
# cache index) while the rest wait; torch's default (30 min gloo, 10 min NCCL) would kill a run on a
# large dataset before it starts. A rank that crashes still ends the run at once: the launcher stops
# the whole group when one process exits.
PROCESS_GROUP_TIMEOUT = timedelta(hours=6)


def fsdp_on_cpu(accelerator) -> None:
    """Honour `accelerate launch --use_fsdp` on a CPU machine instead of silently running DDP.

    Accelerate (1.16) turns the launcher's FSDP settings into `DistributedType.FSDP` only for GPU-like
    devices; with `cpu=True` the same launch becomes MULTI_CPU (DDP over gloo) and every process keeps
    the whole model. torch's `fully_shard` runs on a CPU mesh over gloo, so we finish what Accelerate's
    state would have done on a GPU: the FSDP type and the plugin read from the launcher's variables.
    """
    state = accelerator.state
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # FSDP_VERSION, FSDP_STATE_DICT_TYPE, ... from the launcher
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # barriers and gathers read it here


def topology_lines(accelerator, mixed_precision: str) -> tuple[str, str | None]:
    """What the start of a run prints to confirm the launch: (the run's line, this process's line).

    The run's line (main process): processes, machines, what is distributed and how, the barrier
    timeout. This process's line (every process, only with several): its rank, machine and device,
    so a wrong host file or a missing --machine_rank shows at once.
    """
    world, rank = accelerator.num_processes, accelerator.process_index
    per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", world)) or world
    machines = max(1, world // per_machine)
    kind = accelerator.distributed_type.value
    if kind == "FSDP":
        how = (f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}: the UNet's weights, gradients and optimizer "
               "state sharded across the processes")
    elif world > 1:
        how = "DDP: every process holds the whole model; gradients are averaged every optimizer step"
    else:
        how = "one process"
    timeout = barrier_timeout()
    waits = f"; barrier timeout {timeout.total_seconds() / 3600:g} h" if timeout is not None else ""
    run = (f"processes: {world} ({accelerator.device}, {kind}) = {machines} machine{'s' if machines > 1 else ''} "
           f"x {per_machine}; {how}{waits}; mixed precision: {mixed_precision}")
    mine = None
    if world > 1:
        mine = (f"rank {rank} of {world}: machine {rank // per_machine} of {machines} ({socket.gethostname()}), "
                f"local rank {accelerator.local_process_index}, device {accelerator.device}")
    return run, mine


def barrier_timeout() -> timedelta | None:
    """The process group's timeout as torch holds it (None without a group, or if torch hides it)."""
    if not dist.is_available() or not dist.is_initialized():
        return None
    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return dist.group.WORLD._get_backend(device).options._timeout
    except (AttributeError, RuntimeError):  # private API: print nothing rather than fail the run
        return None
