"""The trainer end to end on the tiny model: it learns, saves, resumes exactly, and never loses a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import make_image
from trainer_runs import adapter_tensors, assert_resolved_is_the_runs, write_config
from finetune.config import load_config
from finetune.errors import CheckpointError, FinetuneError
from finetune.train.recipe import train

pytestmark = pytest.mark.slow


def test_lora_run_writes_a_kohya_lora_that_changes_the_unet(tmp_path, tiny_model_dir, shapes_folder):
    from diffusers import StableDiffusionXLPipeline

    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=12, every=6))
    result = train(cfg, progress=False)
    assert result.step == 12 and result.output_path.is_file()
    tensors = adapter_tensors(result.output_path)
    ups = [k for k in tensors if k.endswith(".lora_up.weight")]
    assert ups and all(k.startswith("lora_unet_") for k in ups)
    assert any(tensors[k].abs().sum() > 0 for k in ups)  # trained: up weights left zero-init
    assert all(float(tensors[k]) == 4.0 for k in tensors if k.endswith(".alpha"))
    # output.save_dtype = "fp16" by default (what LoRAs are shared as); alpha is a scale and stays fp32.
    assert {tensors[k].dtype for k in tensors if not k.endswith(".alpha")} == {torch.float16}
    assert {tensors[k].dtype for k in tensors if k.endswith(".alpha")} == {torch.float32}
    from safetensors import safe_open

    with safe_open(str(result.output_path), "pt") as fh:
        metadata = fh.metadata()
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert len(metadata["ss_sd_model_hash"]) == 8 and metadata["ss_network_alpha"] == "4.0"

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model_dir, local_files_only=True)
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = {"encoder_hidden_states": torch.randn(1, 77, pipe.unet.config.cross_attention_dim),
            "added_cond_kwargs": {"text_embeds": torch.randn(1, 64), "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]])}}
    with torch.no_grad():
        before = pipe.unet(sample, torch.tensor([400]), **cond).sample
        pipe.load_lora_weights(str(result.output_path))
        after = pipe.unet(sample, torch.tensor([400]), **cond).sample
    assert (after - before).abs().max() > 1e-4

    # Outputs beside the adapter: manifest, resolved config, checkpoints with their own usable file.
    from bucketing.manifest import load_manifest

    assert len(load_manifest(cfg.output.manifest_dir)) == len(list(shapes_folder.glob("*.png")))
    assert (cfg.output.dir / "config.resolved.toml").is_file()
    state = json.loads((result.checkpoint / "train_state.json").read_text())
    assert state["step"] == 12 and state["images_seen"] == 24 and state["num_processes"] == 1
    assert (result.checkpoint / "lora.safetensors").is_file()


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, tiny_model_dir, shapes_folder):
    whole = tmp_path / "whole"
    whole.mkdir()
    full = train(load_config(write_config(whole, tiny_model_dir, shapes_folder, steps=6, every=3)), progress=False)

    parts = tmp_path / "parts"
    parts.mkdir()
    path = write_config(parts, tiny_model_dir, shapes_folder, steps=6, every=3)
    first = train(load_config(path, ["training.max_steps=3"]), progress=False)
    assert first.step == 3
    with pytest.raises(CheckpointError, match="--resume"):  # forgot --resume: refused before anything is written
        train(load_config(path), progress=False)
    resumed = train(load_config(path), resume="latest", progress=False)
    assert resumed.step == 6
    a, b = adapter_tensors(full.output_path), adapter_tensors(resumed.output_path)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full.losses[3:] == resumed.losses


def test_max_epochs_sets_the_length_and_epoch_cadences_save_and_sample(tmp_path, tiny_model_dir, shapes_folder, capsys):
    import re

    path = write_config(tmp_path, tiny_model_dir, shapes_folder, steps=1000, every=1000)
    per_epoch = ['sample.prompts=["a red drawing"]', "sample.every_n_epochs=1", "sample.steps=2",
                 "sample.height=64", "sample.width=64", "checkpoint.every_n_epochs=1",
                 "checkpoint.keep_last=1", "checkpoint.keep_weights=true"]
    result = train(load_config(path, ["training.max_epochs=2", *per_epoch]), progress=False)
    found = re.search(r"training.max_epochs = 2: (\d+) optimizer steps \((\d+) batches", capsys.readouterr().out)
    steps, batches = int(found[1]), int(found[2])
    assert batches >= 2 and steps == 2 * batches == result.step  # max_epochs replaced max_steps = 1000
    # A checkpoint at each epoch's end and no other; the pruned one left its LoRA behind.
    assert [p.name for p in (tmp_path / "out" / "checkpoints").glob("step-*")] == [f"step-{2 * batches:06d}"]
    assert sorted(p.name for p in (tmp_path / "out").glob("lora-step-*")) == [f"lora-step-{batches:06d}.safetensors"]
    assert adapter_tensors(tmp_path / "out" / f"lora-step-{batches:06d}.safetensors")
    samples = sorted(p.name for p in (tmp_path / "out" / "samples").glob("*.png"))
    assert samples == [f"step-{batches:06d}.png", f"step-{2 * batches:06d}.png"]  # the last one rendered once

    resumed = train(load_config(path, ["training.max_epochs=3", *per_epoch]), resume="latest", progress=False)
    assert resumed.step == 3 * batches and len(resumed.losses) == batches  # one more epoch, none repeated
    assert len(list((tmp_path / "out").glob("lora-step-*"))) == 2
    state = json.loads((resumed.checkpoint / "train_state.json").read_text())
    assert state["images_seen"] == 3 * len(list(shapes_folder.glob("*.png")))


def test_lora_plus_reaches_the_optimizer_and_its_schedule(tmp_path, tiny_model_dir, shapes_folder):
    from finetune.train.recipe import Recipe

    run = Recipe(load_config(write_config(tmp_path, tiny_model_dir, shapes_folder), ["lora.plus_ratio=16"]),
                 progress=False).setup()
    assert sorted({group["lr"] for group in run.parts.optimizer.param_groups}) == [2e-3, 32e-3]
    assert sorted(set(run.parts.lr_scheduler.get_last_lr())) == [2e-3, 32e-3]
    run.accelerator.end_training()


def test_lora_max_norm_bounds_every_written_module(tmp_path, tiny_model_dir, shapes_folder):
    from finetune.adapters.norms import lora_delta_norm

    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=4, every=10),
                      ["lora.max_norm=0.001", "output.save_dtype=fp32", "logging.report_to=tensorboard",
                       "logging.every_n_steps=1"])
    tensors = adapter_tensors(train(cfg, progress=False).output_path)
    downs = [k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")]
    norms = [lora_delta_norm(tensors[f"{m}.lora_down.weight"], tensors[f"{m}.lora_up.weight"],
                             float(tensors[f"{m}.alpha"]) / tensors[f"{m}.lora_down.weight"].shape[0]).item()
             for m in downs]
    assert max(norms) <= 0.001 * (1 + 1e-4) and sum(n > 0.0009 for n in norms) > 0  # bounded, and binding
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = next((cfg.output.dir / "logs").rglob("events.out.tfevents*"))
    assert {"keys_scaled", "max_norm"} <= set(EventAccumulator(str(events.parent)).Reload().Tags()["scalars"])


def test_resume_without_checkpoint_is_an_error_and_a_changed_config_is_refused(tmp_path, tiny_model_dir, shapes_folder):
    from safetensors import safe_open

    path = write_config(tmp_path, tiny_model_dir, shapes_folder, steps=2, every=1)
    with pytest.raises(CheckpointError, match="no complete checkpoint in .*checkpoints"):
        train(load_config(path), resume="latest", progress=False)
    assert not (tmp_path / "out" / "manifest").exists()  # refused before any work
    assert train(load_config(path), progress=False).step == 2
    # What cannot change the math already done changes freely: length, cadences, prompts, logging.
    free = ["training.max_steps=3", "checkpoint.every_n_steps=7", "logging.every_n_steps=2", "checkpoint.keep_last=2"]
    assert train(load_config(path, free), resume="latest", progress=False).step == 3
    with pytest.raises(CheckpointError) as info:
        train(load_config(path, ["lora.rank=8", "training.learning_rate=1e-3", "training.max_steps=4"]),
              resume="latest", progress=False)
    message = str(info.value)
    assert "lora.rank: 4 in the checkpoint, 8 now" in message and "training.learning_rate" in message
    assert "--allow-changes" in message and "lora.init_from" in message
    changed = train(load_config(path, ["training.learning_rate=1e-3", "training.max_steps=4"]), resume="latest",
                    progress=False, allow_changes=True)
    assert changed.step == 4
    with safe_open(str(changed.output_path), "pt") as fh:
        metadata = fh.metadata()
    assert metadata["finetune.reproducible"] == "false"
    assert "training.learning_rate: 0.002 in the checkpoint, 0.001 now" in metadata["finetune.changed_on_resume"]


def test_nan_loss_is_skipped_then_stops(tmp_path, tiny_model_dir, shapes_folder, monkeypatch):
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=20, every=10),
                      ["training.max_nan_steps=3"])
    with pytest.raises(FinetuneError) as info:
        train(cfg, progress=False, step_loss=lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    assert "NaN/inf 3 steps in a row" in str(info.value)


class _NaNGradient(torch.autograd.Function):
    """The loss unchanged, its gradient NaN: what an overflow inside backward looks like."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused-backward"])
def test_nan_gradients_behind_a_finite_loss_never_reach_the_weights(tmp_path, tiny_model_dir, shapes_folder,
                                                                   monkeypatch, fused):
    from finetune.train.recipe import Recipe
    from finetune.train.step import diffusion_step_loss

    runs = []
    real_setup = Recipe.setup
    monkeypatch.setattr(Recipe, "setup", lambda self, *a, **k: runs.append(real_setup(self, *a, **k)) or runs[-1])
    overrides = ["training.max_nan_steps=2"]
    if fused:
        overrides += ["training.method=full", "memory.fused_backward=true", "training.learning_rate=1e-4"]
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=20, every=10), overrides)
    with pytest.raises(FinetuneError) as info:
        train(cfg, progress=False, step_loss=lambda *a, **k: _NaNGradient.apply(diffusion_step_loss(*a, **k)))
    assert "NaN/inf 2 steps in a row at step 0" in str(info.value)
    assert all(torch.isfinite(p).all() for p in runs[0].parts.params)


# `finetune train` as a user runs it, with Ctrl-C pressed at a named point: inside step 3's loss. Covers what
# no in-process test can (the handler, the printed hint, exit code 130). A kill -9 is covered at named points
# by test_resume_safety.py::test_kill_9_inside_a_save_then_resume_is_bitwise_equal.
CTRL_C_IN_STEP_3 = """
import os, signal, sys
import finetune.train.recipe as recipe
from finetune.cli import main
from finetune.train.step import diffusion_step_loss

calls = 0

def ctrl_c_in_step_3(*args, **kwargs):
    global calls
    calls += 1
    if calls == 3:  # one micro-step per step here
        os.kill(os.getpid(), signal.SIGINT)
    return diffusion_step_loss(*args, **kwargs)

real = recipe.train
recipe.train = lambda cfg, **kwargs: real(cfg, step_loss=ctrl_c_in_step_3, **kwargs)
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_saves_a_checkpoint_exits_130_and_prints_a_resume_command_that_works(
        tmp_path, tiny_model_dir, shapes_folder):
    import shlex

    path = write_config(tmp_path, tiny_model_dir, shapes_folder, steps=400, every=1000)
    elsewhere = tmp_path / "elsewhere"
    proc = subprocess.Popen([sys.executable, "-c", CTRL_C_IN_STEP_3, "train", str(path), "--set",
                             f"output.dir={elsewhere}", "--set", "training.max_steps=300"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out  # stopped early: not a finished run
    assert "\nstop requested" in out  # on its own line, not glued to the progress bar
    step = json.loads((elsewhere / "checkpoints" / (elsewhere / "checkpoints" / "latest").read_text().strip()
                       / "train_state.json").read_text())["step"]
    assert step == 3  # the step under way when Ctrl-C came was finished, then saved
    hint = shlex.split(out.split("resume with: ")[1].splitlines()[0])
    assert hint[:4] == ["finetune", "train", str(path), "--resume"]
    assert f'output.dir="{elsewhere}"' in hint and "training.max_steps=300" in hint  # recorded resolved
    # The hint continues the same run (its folder, its settings): finish it at the step reached.
    finish = [sys.executable, "-m", *hint, "--set", f"training.max_steps={step}"]
    done = subprocess.run(finish, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout and (elsewhere / "lora.safetensors").is_file()
    again = subprocess.run(finish, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "finished already" in again.stdout, again.stdout + again.stderr
    assert "resumed from" not in again.stdout  # no work
    assert not (tmp_path / "out").exists()  # the config's own output.dir was never used


@pytest.mark.parametrize("profile", ["min_vram", "low_vram", "balanced", "fast"])
def test_every_memory_profile_trains_on_cpu(tmp_path, tiny_model_dir, shapes_folder, profile, capsys):
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=2, every=10),
                      ["training.mixed_precision=no", f"memory.profile={profile}"])
    result = train(cfg, progress=False)
    assert f"memory profile {profile}" in capsys.readouterr().out
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    tensors = adapter_tensors(result.output_path)
    assert any(tensors[k].abs().sum() > 0 for k in tensors if k.endswith(".lora_up.weight"))


@pytest.mark.parametrize("profile", ["min_vram", "balanced", "fast"])
def test_every_full_fine_tune_profile_trains_on_cpu(tmp_path, tiny_model_dir, shapes_folder, profile, capsys):
    # bf16 autocast, so min_vram and balanced run bf16 weights with stochastic rounding; AdamW
    # stands in for the 8-bit optimizer, whose CPU fallback takes seconds a step.
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=2, every=10),
                      ["training.method=full", "training.learning_rate=1e-4", "optimizer.name=adamw",
                       f"memory.profile={profile}"])
    result = train(cfg, progress=False)
    out = capsys.readouterr().out
    assert f"memory profile {profile}" in out
    assert ("memory.fused_backward=True" in out) == (profile != "fast")
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert all(k.startswith("model.diffusion_model.") for k in adapter_tensors(result.output_path))


def test_masked_loss_reads_the_mask_beside_the_image(tmp_path, tiny_model_dir):
    from bucketing.manifest import load_manifest
    from finetune.train.batches import load_mask

    folder = tmp_path / "masked"
    for i in range(2):
        make_image(folder / f"{i}.png", 128, 128, color=(200, 100 * i, 40))
        half = torch.zeros(128, 128, dtype=torch.uint8)
        half[:, :64] = 255
        from PIL import Image

        Image.fromarray(half.numpy()).save(folder / f"{i}_mask.png")
    cfg = load_config(write_config(tmp_path, tiny_model_dir, folder, steps=2, every=10), ["loss.masked=true"])
    result = train(cfg, progress=False)
    assert result.step == 2
    manifest = load_manifest(cfg.output.manifest_dir)
    assert len(manifest) == 2 and all(manifest["mask_path"])  # masks are not training images
    mask = load_mask(manifest[0])
    assert mask.shape == (1, 128, 128) and mask[0, :, :60].min() == 1 and mask[0, :, 68:].max() == 0


def test_full_fine_tune_with_ema_writes_a_unet_file(tmp_path, tiny_model_dir, shapes_folder):
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=3, every=10),
                      ["training.method=full", "training.learning_rate=1e-4", "training.ema_decay=0.9"])
    result = train(cfg, progress=False)
    assert_resolved_is_the_runs(cfg.output.dir)
    tensors = adapter_tensors(result.output_path)
    assert all(k.startswith("model.diffusion_model.") for k in tensors)
    from diffusers import UNet2DConditionModel

    from finetune.models.sgm_keys import unet_state_dict_to_sgm

    base = unet_state_dict_to_sgm(UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").state_dict(),
                                  dict(UNet2DConditionModel.load_config(tiny_model_dir / "unet")))
    assert set(tensors) == {f"model.diffusion_model.{k}" for k in base}
    changed = [k for k in base if not torch.equal(tensors[f"model.diffusion_model.{k}"], base[k].half())]
    assert changed  # trained (EMA-averaged) weights differ from the base


def test_lora_with_ema_trains_the_same_and_writes_the_averaged_adapter(tmp_path, tiny_model_dir, shapes_folder):
    results = []
    for name, overrides in (("plain", []), ("ema", ["training.ema_decay=0.5"])):
        (tmp_path / name).mkdir()
        cfg = load_config(write_config(tmp_path / name, tiny_model_dir, shapes_folder, steps=6, every=10), overrides)
        results.append(train(cfg, progress=False))
    plain, ema = results
    assert plain.losses == ema.losses  # the average never feeds back into training
    a, b = adapter_tensors(plain.output_path), adapter_tensors(ema.output_path)
    ups = [k for k in a if k.endswith(".lora_up.weight")]
    # up matrices start at zero and grow: their average over recent steps is smaller than the last step
    assert sum(b[k].float().norm() for k in ups) < 0.95 * sum(a[k].float().norm() for k in ups)


def test_training_from_caches_matches_training_from_images(tmp_path, tiny_model_dir, shapes_folder):
    losses = []
    for cached in (True, False):
        work = tmp_path / str(cached)
        work.mkdir()
        cfg = load_config(write_config(work, tiny_model_dir, shapes_folder, steps=2, every=10),
                          ["cache.dtype=fp32", f"cache.latents={str(cached).lower()}", f"cache.text={str(cached).lower()}"])
        losses.append(train(cfg, progress=False).losses)
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_text_encoder_lora_trains_and_is_saved_with_kohya_names(tmp_path, tiny_model_dir, shapes_folder):
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=2, every=10),
                      ["training.train_text_encoder=true", "cache.text=false", "training.text_encoder_lr=1e-3"])
    result = train(cfg, progress=False)
    keys = adapter_tensors(result.output_path).keys()
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_unet_") for k in keys)


def test_regularization_images_carry_the_prior_loss_weight(tmp_path, tiny_model_dir, shapes_folder):
    from finetune.train.batches import TrainDataset
    from bucketing.manifest import load_manifest

    reg = tmp_path / "reg"
    make_image(reg / "r.png", 128, 128, color=(10, 200, 10))
    extra = f'\n[[dataset.subsets]]\nfolder = "{reg}"\nis_regularization = true\nclass_prompt = "a drawing"\n'
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=1, every=10, extra=extra),
                      ["loss.prior_loss_weight=0.25"])
    train(cfg, progress=False)
    manifest = load_manifest(cfg.output.manifest_dir)
    dataset = TrainDataset(manifest, cfg.dataset, seed=0, prior_loss_weight=0.25, latents=lambda i: {"mean": None})
    weights = {manifest[i]["subset"]: float(dataset[i]["loss_weight"]) for i in range(len(manifest))}
    assert weights["reg"] == 0.25 and weights[shapes_folder.name] == 1.0
    assert [r["caption"] for r in manifest if r["is_regularization"]] == ["a drawing"]


def test_samples_and_tensorboard_logs_are_written(tmp_path, tiny_model_dir, shapes_folder):
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=2, every=10), [
        'sample.prompts=["a red drawing"]', "sample.seeds=[0, 1]", "sample.every_n_steps=1", "sample.steps=2",
        "sample.height=64", "sample.width=64", "logging.report_to=tensorboard", "logging.every_n_steps=1"])
    train(cfg, progress=False)
    from PIL import Image

    grid = Image.open(cfg.output.dir / "samples" / "step-000001.png")
    assert grid.size == (128, 64 + 14)  # one row: the prompt, one column per seed, a label strip under it
    assert (cfg.output.dir / "samples" / "step-000002.png").is_file()
    events = list((cfg.output.dir / "logs").rglob("events.out.tfevents*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(events[0].parent)).Reload()
    assert "samples" in logged.Tags()["images"] and "loss" in logged.Tags()["scalars"]
    assert [e.step for e in logged.Images("samples")] == [1, 2]  # every sample grid, beside the loss


def test_random_crop_changes_per_epoch_and_is_reproducible(tmp_path, tiny_model_dir, shapes_folder):
    from bucketing.manifest import load_manifest
    from finetune.train.batches import TrainDataset

    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=1, every=10),
                      ["dataset.crop=random", "cache.latents=false"])
    train(cfg, progress=False)
    manifest = load_manifest(cfg.output.manifest_dir)
    wide = next(i for i, r in enumerate(manifest) if r["original_size"] == [96, 160])
    dataset = TrainDataset(manifest, cfg.dataset, seed=3, text=lambda c: (None, None))
    crops = []
    for epoch in range(6):
        dataset.set_epoch(epoch)
        sample = dataset[wide]
        crops.append(tuple(sample["add_time_ids"][2:4].tolist()))
        assert sample["pixels"].shape[1:] == tuple(manifest[wide]["bucket"])
    assert len(set(crops)) > 1
    dataset.set_epoch(2)
    assert tuple(dataset[wide]["add_time_ids"][2:4].tolist()) == crops[2]


def test_text_encoder_training_accumulates_over_every_trained_model(tmp_path, tiny_model_dir, shapes_folder, monkeypatch):
    from accelerate import Accelerator

    seen = []
    real = Accelerator.accumulate

    def spy(self, *models):
        seen.append(len(models))
        return real(self, *models)

    monkeypatch.setattr(Accelerator, "accumulate", spy)
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=2, every=10),
                      ["training.train_text_encoder=true", "cache.text=false", "training.gradient_accumulation_steps=2"])
    assert train(cfg, progress=False).step == 2
    assert seen and set(seen) == {3}  # the UNet and both text encoders skip DDP's sync on every micro-step


def test_wandb_logs_offline_into_the_run_folder(tmp_path, tiny_model_dir, shapes_folder, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "online")  # recorded, so the undo below restores the suite's value
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=2, every=10),
                      ["logging.report_to=wandb", "logging.every_n_steps=1", 'sample.prompts=["a red drawing"]',
                       "sample.steps=2", "sample.height=64", "sample.width=64"])
    train(cfg, progress=False)
    assert os.environ["WANDB_MODE"] == "offline"  # no key, no network: the trainer chose offline itself
    runs = list((cfg.output.dir / "logs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert list(runs[0].rglob("media/images/samples_*.png"))  # the final sample grid went to wandb too
    assert not (tmp_path / "wandb").exists()  # nothing written into the shell's folder


def test_out_of_memory_names_the_settings_to_change(tmp_path, tiny_model_dir, shapes_folder, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=2, every=10))
    with pytest.raises(FinetuneError) as info:
        train(cfg, progress=False, step_loss=oom)
    message = str(info.value)
    for key in ("training.batch_size", "memory.gradient_checkpointing", "memory.base_dtype", "memory.profile"):
        assert key in message


@pytest.mark.gpu
def test_fsdp_full_fine_tune_saves_resumes_and_writes_the_whole_unet(tmp_path, tiny_model_dir, shapes_folder):
    # Two GPUs shard for real; one still runs every FSDP code path (wrap, gather, sharded save and load).
    processes = str(min(2, torch.cuda.device_count()))
    path = write_config(tmp_path, tiny_model_dir, shapes_folder, steps=4, every=2)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
              "--num_processes", processes, "--num_machines", "1", "--mixed_precision", "bf16",
              "--dynamo_backend", "no", "-m", "finetune", "train", str(path), "--set", "training.method=full",
              "--set", "training.learning_rate=1e-5", "--set", "training.mixed_precision=bf16"]
    first = subprocess.run(launch + ["--set", "training.max_steps=2"], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    done = subprocess.run(launch + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from" in done.stdout and f"processes: {processes} (cuda:0, FSDP)" in done.stdout
    tensors = adapter_tensors(tmp_path / "out" / "lora.safetensors")
    assert tensors and all(k.startswith("model.diffusion_model.") for k in tensors)


def test_fused_backward_with_bf16_weights_trains_and_resumes_bitwise(tmp_path, tiny_model_dir, shapes_folder):
    overrides = ["training.method=full", "training.learning_rate=1e-4", "memory.fused_backward=true",
                 "memory.weight_dtype=bf16", "training.mixed_precision=bf16", "output.save_dtype=bf16"]
    whole = tmp_path / "whole"
    whole.mkdir()
    full = train(load_config(write_config(whole, tiny_model_dir, shapes_folder, steps=2, every=1), overrides),
                 progress=False)
    assert full.step == 2 and all(torch.isfinite(torch.tensor(full.losses)))
    saved = adapter_tensors(full.checkpoint / "trainable_0.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.bfloat16}  # no fp32 master copy anywhere

    parts = tmp_path / "parts"
    parts.mkdir()
    path = write_config(parts, tiny_model_dir, shapes_folder, steps=2, every=1)
    assert train(load_config(path, overrides + ["training.max_steps=1"]), progress=False).step == 1
    resumed = train(load_config(path, overrides), resume="latest", progress=False)
    a, b = adapter_tensors(full.output_path), adapter_tensors(resumed.output_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {v.dtype for v in a.values()} == {torch.bfloat16}  # the UNet file in output.save_dtype
    assert full.losses[1:] == resumed.losses

    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet").state_dict()
    trained = adapter_tensors(full.checkpoint / "trainable_0.safetensors")
    moved = [k for k in trained if not torch.equal(trained[k], base[k].bfloat16())]
    assert len(moved) > len(trained) // 2  # bf16 weights moved: the small updates were not rounded away


@pytest.mark.parametrize("base", ["nf4", "fp8"])
def test_lora_on_a_quantized_base_trains_and_writes_a_kohya_file(tmp_path, tiny_model_dir, shapes_folder, base):
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=2, every=1),
                      ["training.mixed_precision=bf16", f"memory.base_dtype={base}"])
    result = train(cfg, progress=False)
    assert result.step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    tensors = adapter_tensors(result.output_path)
    ups = [k for k in tensors if k.endswith(".lora_up.weight")]
    assert ups and all(k.startswith("lora_unet_") for k in tensors)
    assert any(tensors[k].abs().sum() > 0 for k in ups)
    # The checkpoint holds the fp32 adapter only, never the quantized base.
    saved = adapter_tensors(result.checkpoint / "trainable_0.safetensors")
    assert saved and all("lora_" in k and v.dtype == torch.float32 for k, v in saved.items())


def test_two_runs_in_one_process_may_use_different_precisions(tmp_path, tiny_model_dir, shapes_folder):
    for precision in ("no", "bf16"):
        work = tmp_path / precision
        work.mkdir()
        cfg = load_config(write_config(work, tiny_model_dir, shapes_folder, steps=1, every=10),
                          [f"training.mixed_precision={precision}"])
        assert train(cfg, progress=False).step == 1


@pytest.mark.gpu
@pytest.mark.parametrize("overrides", [
    ["training.mixed_precision=fp16", "memory.base_dtype=fp16"],  # loss scaling through Accelerate's GradScaler
    ["training.mixed_precision=bf16", "memory.base_dtype=bf16", "optimizer.name=adamw8bit"],
    ["training.mixed_precision=bf16", "optimizer.name=paged_adamw8bit", "memory.gradient_checkpointing=true"],
    ["training.mixed_precision=bf16", "optimizer.name=lion8bit", "memory.base_dtype=nf4"],
    ["training.mixed_precision=bf16", "training.method=full", "memory.fused_backward=true",
     "memory.weight_dtype=bf16", "optimizer.name=adamw8bit", "training.learning_rate=1e-5"],
    ["training.mixed_precision=bf16", "memory.base_dtype=bf16", "memory.compile=true",
     'sample.prompts=["a red drawing"]', "sample.steps=2", "sample.height=64", "sample.width=64"],
], ids=["fp16", "bf16-adamw8bit", "paged-checkpointed", "lion8bit-nf4", "full-fused-bf16", "compiled"])
def test_cuda_precisions_and_8bit_optimizers_train(tmp_path, tiny_model_dir, shapes_folder, overrides):
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=4, every=2), overrides)
    result = train(cfg, progress=False)
    assert result.step == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.output_path.is_file() and (result.checkpoint / "trainable_0.safetensors").is_file()


def test_block_lr_scale_zero_freezes_that_block(tmp_path, tiny_model_dir, shapes_folder):
    cfg = load_config(write_config(tmp_path, tiny_model_dir, shapes_folder, steps=2, every=10),
                      ['training.block_lr_scale={"mid_block" = 0.0}'])
    tensors = adapter_tensors(train(cfg, progress=False).output_path)
    ups = {k: tensors[k] for k in tensors if k.endswith(".lora_up.weight")}
    middle = [k for k in ups if k.startswith("lora_unet_middle_block_")]
    assert middle and all(ups[k].abs().sum() == 0 for k in middle)  # zero-initialised and never moved
    assert any(ups[k].abs().sum() > 0 for k in ups if k not in middle)
