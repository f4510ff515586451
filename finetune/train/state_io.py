"""A checkpoint's training state without pickle: trained weights, optimizers, LR schedules, grad scaler,
registered objects (EMA, new words), the Accelerate step and every process's RNG, written as
safetensors (tensors) + JSON (the rest) and read back with `safetensors.load_file` and `json` only.

A state dict becomes two files, `<stem>.json` (its structure, each tensor replaced by a reference) and
`<stem>.safetensors` (the tensors). Tuples, dicts with non-string keys and numpy arrays are tagged in the
JSON so they come back as the same types: an optimizer restored this way steps bit for bit as before.
FSDP runs keep Accelerate's `save_state` (torch.distributed.checkpoint pickles its metadata).
"""

from __future__ import annotations

import errno
import json
import random
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import DistributedType
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from finetune.errors import CheckpointError
from finetune.train import checkpoint_files

STATE_STEM = "training_state"  # main process: optimizers, schedulers, scaler, registered objects, step
TRAINED_FILE = "trainable_{}.safetensors"  # model i's trained parameters, by their bare names
RNG_STEM = "rng_{}"  # process i's RNG states
_TENSOR, _ARRAY, _TUPLE, _ITEMS = "__tensor__", "__ndarray__", "__tuple__", "__items__"
_TAGS = (_TENSOR, _ARRAY, _TUPLE, _ITEMS)


# --- state dicts as JSON + safetensors ----------------------------------------------------------

def flatten(obj, tensors: dict[str, torch.Tensor]):
    """`obj` as JSON values; each tensor (or numpy array) moves into `tensors` and is replaced by its key.

    Raises:
        TypeError: a value JSON cannot hold and that is no tensor (the state would need pickle).
    """
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, np.ndarray):
        key = str(len(tensors))
        tensors[key] = torch.from_numpy(np.ascontiguousarray(obj).copy())
        return {_ARRAY: key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not (len(obj) == 1 and next(iter(obj)) in _TAGS):
            return {k: flatten(v, tensors) for k, v in obj.items()}
        return {_ITEMS: [[flatten(k, tensors), flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [flatten(v, tensors) for v in obj]
    if obj is None or type(obj) in (bool, int, float, str):
        return obj
    raise TypeError(f"cannot save a {type(obj).__module__}.{type(obj).__qualname__} without pickle")


def unflatten(obj, tensors: dict[str, torch.Tensor]):
    """The inverse of `flatten`: the same values, types and tensors (on the CPU)."""
    if isinstance(obj, list):
        return [unflatten(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1 and (tag := next(iter(obj))) in _TAGS:
        value = obj[tag]
        if tag == _TENSOR:
            return tensors[value]
        if tag == _ARRAY:
            return tensors[value].numpy()
        if tag == _TUPLE:
            return tuple(unflatten(v, tensors) for v in value)
        return {_hashable(unflatten(k, tensors)): unflatten(v, tensors) for k, v in value}
    return {k: unflatten(v, tensors) for k, v in obj.items()}


def _hashable(key):
    return tuple(key) if isinstance(key, list) else key


def write_tree(tree, folder: Path, stem: str) -> None:
    """`<stem>.json` and `<stem>.safetensors` in `folder`."""
    tensors: dict[str, torch.Tensor] = {}
    structure = flatten(tree, tensors)
    _save_file(tensors, folder / f"{stem}.safetensors")
    (folder / f"{stem}.json").write_text(json.dumps(structure), encoding="utf-8")


def read_tree(folder: Path, stem: str):
    """What `write_tree` wrote; nothing here can run code.

    Raises:
        CheckpointError: a file is missing or unreadable (names it).
    """
    path = folder / f"{stem}.json"
    try:
        structure = json.loads(path.read_text(encoding="utf-8"))
        path = folder / f"{stem}.safetensors"
        return unflatten(structure, load_file(str(path), device="cpu"))
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); resume from an earlier checkpoint") from None


# --- RNG -----------------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's RNG states: Python `random`, numpy, torch CPU and every CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


# --- the run's state ----------------------------------------------------------------------------

def trained_parameters(acc, model) -> dict:
    """The trained parameters by the bare model's names (the same with or without DDP or torch.compile)."""
    bare = acc.unwrap_model(model, keep_torch_compile=False)
    return {n: p for n, p in bare.named_parameters() if p.requires_grad}


def save_trained(acc, models: list, folder: Path) -> None:
    """`trainable_i.safetensors`: model i's trained parameters only (a LoRA checkpoint is MBs, not the UNet)."""
    for i, model in enumerate(models):
        trained = {n: p.detach().cpu().contiguous() for n, p in trained_parameters(acc, model).items()}
        _save_file(trained, Path(folder) / TRAINED_FILE.format(i))


def _save_file(tensors: dict, path: Path) -> None:
    """safetensors' `save_file`, its I/O failures raised as OSError (a full disk as ENOSPC) like every write."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as err:
        code = errno.ENOSPC if "No space left" in str(err) else errno.EIO
        raise OSError(code, str(err), str(path)) from None


def load_trained(acc, models: list, folder: Path) -> None:
    """Copy each model's trained parameters back from `trainable_i.safetensors`.

    Raises:
        CheckpointError: the file is unreadable or its names are not this model's.
    """
    for i, model in enumerate(models):
        path = Path(folder) / TRAINED_FILE.format(i)
        try:
            saved = load_file(str(path))
        except (OSError, SafetensorError) as err:
            raise CheckpointError(f"{path}: unreadable ({err}); resume from an earlier checkpoint") from None
        saved = {_bare_name(n): v for n, v in saved.items()}  # checkpoints that kept a wrapper's prefix
        params = trained_parameters(acc, model)
        if set(params) != set(saved):
            raise CheckpointError(f"{folder}: its trained weights do not match this model's "
                                  f"({len(set(params) ^ set(saved))} names differ)")
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def _bare_name(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def save_training_state(acc, folder: Path) -> None:
    """Everything `acc` prepared or had registered for checkpointing, into `folder` (which exists).

    The main process writes the weights and the shared state (DDP keeps them equal on every process);
    every process writes its own RNG states. Accelerate's lists are read as its `save_state` reads them.
    """
    folder = Path(folder)
    if acc.is_main_process:
        save_trained(acc, acc._models, folder)
        state = {"step": acc.step,
                 "optimizers": [optimizer.state_dict() for optimizer in acc._optimizers],
                 "schedulers": [scheduler.state_dict() for scheduler in acc._schedulers],
                 "objects": [obj.state_dict() for obj in acc._custom_objects],
                 "scaler": acc.scaler.state_dict() if acc.scaler is not None else None}
        write_tree(state, folder, STATE_STEM)
    write_tree(rng_state(), folder, RNG_STEM.format(acc.process_index))


def load_training_state(acc, folder: Path) -> None:
    """Restore what `save_training_state` wrote into the prepared run, on every process.

    Raises:
        CheckpointError: a file is unreadable, or holds other objects than this run registered.
    """
    folder = Path(folder)
    load_trained(acc, acc._models, folder)
    state = read_tree(folder, STATE_STEM)
    for kind, objects in (("optimizers", acc._optimizers), ("schedulers", acc._schedulers),
                          ("objects", acc._custom_objects)):
        if len(state[kind]) != len(objects):
            raise CheckpointError(f"{folder / (STATE_STEM + '.json')}: holds {len(state[kind])} {kind}, this run "
                                  f"has {len(objects)}: it was written by a run with other settings")
    for optimizer, saved in zip(acc._optimizers, state["optimizers"]):
        optimizer.load_state_dict(saved)  # torch and bitsandbytes move the state to each parameter's device
    for scheduler, saved in zip(acc._schedulers, state["schedulers"]):
        scheduler.load_state_dict(saved)
    for obj, saved in zip(acc._custom_objects, state["objects"]):
        obj.load_state_dict(_placed_like(saved, obj.state_dict()))
    if acc.scaler is not None and state["scaler"] is not None:
        acc.scaler.load_state_dict(state["scaler"])
    acc.step = state["step"]
    set_rng_state(read_tree(folder, RNG_STEM.format(acc.process_index)))


def _placed_like(saved, current):
    """`saved` with each tensor on the device of the tensor in the same place of `current` (an EMA's
    shadow weights live beside the weights they average, not on the CPU they were read onto)."""
    if isinstance(saved, torch.Tensor) and isinstance(current, torch.Tensor):
        return saved.to(current.device)
    if isinstance(saved, dict) and isinstance(current, dict):
        return {k: _placed_like(v, current.get(k)) for k, v in saved.items()}
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)) and len(saved) == len(current):
        return type(saved)(_placed_like(s, c) for s, c in zip(saved, current))
    return saved


def save_checkpoint_state(acc, folder: Path) -> str:
    """The training state into `folder`, on every process; returns how it was saved (for `files.json`).

    FSDP shards go through Accelerate's `save_state` (torch.distributed.checkpoint pickles its metadata).
    """
    if acc.distributed_type == DistributedType.FSDP:
        acc.save_state(str(folder))
        return checkpoint_files.FSDP_STATE
    save_training_state(acc, folder)
    return checkpoint_files.PICKLE_FREE


def load_checkpoint_state(acc, folder: Path) -> None:
    """The checkpoint's training state into the prepared run, read with safetensors and json only.

    FSDP shards are read by Accelerate and torch.distributed.checkpoint, which unpickle: said, not silent.

    Raises:
        CheckpointError: the folder holds pickles or damaged files, or a state this run cannot take.
    """
    fsdp_state = checkpoint_files.fsdp_state(folder)
    if acc.distributed_type == DistributedType.FSDP:
        if not fsdp_state:
            raise CheckpointError(f"{folder}: saved without FSDP; resume it without FSDP, or start a new run "
                                  "from its weights")
        acc.print(f"FSDP: loading {folder} through Accelerate and torch.distributed.checkpoint, which "
                  "unpickle their files: resume only checkpoints you wrote")
        acc.load_state(str(folder))
        return
    if fsdp_state:
        raise CheckpointError(f"{folder}: an FSDP checkpoint (sharded, pickled); resume it with the same FSDP launch")
    checkpoint_files.check_intact(folder)
    load_training_state(acc, folder)
