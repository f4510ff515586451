"""Memory profiles fill only what the user left unset; auto picks by free memory and says why."""

from __future__ import annotations

import tomllib

from finetune.config import validate_config
from finetune.memory.profiles import apply_memory_profile, estimate_peak_gib, pick_auto


def config(tmp_path, **keys):
    """A config with `keys` in their tables ([memory] or [training]); the profile is custom unless given."""
    from finetune.config import MemoryConfig

    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "i").mkdir(exist_ok=True)
    memory = {"profile": "custom", **{k: v for k, v in keys.items() if k in MemoryConfig.model_fields}}
    training = {k: v for k, v in keys.items() if k not in MemoryConfig.model_fields}
    raw = {"model": {"pretrained": "m"}, "dataset": {"resolution": 256, "subsets": [{"folder": "i"}]},
           "training": training, "memory": memory}
    return validate_config(raw, base_dir=tmp_path)


def test_profile_fills_unset_keys_and_keeps_the_users(tmp_path):
    cfg = config(tmp_path, profile="low_vram", base_dtype="fp32")
    out, message = apply_memory_profile(cfg)
    assert out.memory.gradient_checkpointing is True
    assert out.optimizer.name == "adamw8bit"
    assert out.memory.base_dtype == "fp32"  # written by the user: the profile leaves it
    assert "low_vram" in message and "memory.base_dtype" not in message
    assert cfg.memory.gradient_checkpointing is False  # the original is not modified


def test_custom_changes_nothing(tmp_path):
    cfg = config(tmp_path)
    assert apply_memory_profile(cfg) == (cfg, None)


def test_auto_picks_by_free_memory_and_says_why(tmp_path):
    assert pick_auto(None)[0] == "custom"
    assert pick_auto(6.5)[0] == "min_vram"
    assert pick_auto(7.5)[0] == "low_vram"
    assert pick_auto(11.0)[0] == "balanced"
    name, why = pick_auto(15.5)
    assert name == "fast" and "15.5 GiB free" in why
    out, message = apply_memory_profile(config(tmp_path, profile="auto"), free_gib=7.5)
    assert out.memory.gradient_checkpointing and "low_vram" in message and "7.5 GiB" in message


def test_auto_without_a_gpu_keeps_the_configs_own_keys(tmp_path, monkeypatch):
    from finetune.memory import profiles

    monkeypatch.setattr(profiles, "free_gpu_gib", lambda: None)
    cfg = config(tmp_path, profile="auto")
    out, message = apply_memory_profile(cfg)
    assert out.memory.profile == "custom" and "no CUDA GPU" in message
    assert out.memory.gradient_checkpointing == cfg.memory.gradient_checkpointing
    assert out.memory.compile == cfg.memory.compile


def test_balanced_lora_recomputes_only_the_transformer_blocks(tmp_path):
    out, message = apply_memory_profile(config(tmp_path, profile="balanced"))
    assert out.memory.gradient_checkpointing and out.memory.checkpointing_mode == "transformer"
    assert "memory.checkpointing_mode=transformer" in message


def test_estimate_orders_the_profiles():
    common = dict(num_base_params=2_567_000_000, num_trained_params=23_000_000, pixels=1024 * 1024, batch_size=1)
    fast = estimate_peak_gib(base_dtype="bf16", optimizer="adamw", checkpointing=None, **common)
    low = estimate_peak_gib(base_dtype="bf16", optimizer="adamw8bit", checkpointing="full", **common)
    partial = estimate_peak_gib(base_dtype="bf16", optimizer="adamw8bit", checkpointing="transformer", **common)
    minimal = estimate_peak_gib(base_dtype="nf4", optimizer="adamw8bit", checkpointing="full", **common)
    fp32 = estimate_peak_gib(base_dtype="fp32", optimizer="adamw", checkpointing=None, **common)
    assert minimal < low < partial < fast < fp32
    assert 5 < low < 8 and 12 < fast < 18 and minimal < 4.5


def test_estimate_of_full_fine_tuning_counts_bf16_weights_and_the_fused_backward():
    common = dict(num_base_params=0, num_trained_params=2_567_000_000, pixels=1024 * 1024, batch_size=1,
                  base_dtype="fp32", checkpointing="full")
    plain = estimate_peak_gib(optimizer="adamw", **common)
    fused = estimate_peak_gib(optimizer="adamw8bit", trained_bytes=2, fused_backward=True, **common)
    # bf16 weights (5.1 GB) + 8-bit state (5.1 GB), no gradients, checkpointed activations
    assert 10 < fused < 12.5 < 35 < plain


def test_profiles_depend_on_the_method(tmp_path):
    lora, _ = apply_memory_profile(config(tmp_path, profile="min_vram"))
    assert lora.memory.base_dtype == "nf4" and not lora.memory.fused_backward
    full, message = apply_memory_profile(config(tmp_path, profile="low_vram", method="full"))
    assert full.memory.fused_backward and full.memory.weight_dtype == "bf16"
    assert full.optimizer.name == "adamw8bit" and "memory.fused_backward=True" in message
    assert pick_auto(20.0, "full")[0] == "low_vram" and pick_auto(20.0, "lora")[0] == "fast"
    assert pick_auto(12.0, "full")[0] == "min_vram" and pick_auto(22.0, "full")[0] == "balanced"


def test_profile_drops_the_fused_backward_where_it_cannot_work_and_says_why(tmp_path):
    out, message = apply_memory_profile(config(tmp_path, profile="low_vram", method="full",
                                               gradient_accumulation_steps=4))
    assert not out.memory.fused_backward and out.memory.weight_dtype == "fp32"
    assert "not with gradient accumulation" in message
    out, message = apply_memory_profile(config(tmp_path, profile="low_vram", method="full"), num_processes=2)
    assert not out.memory.fused_backward and "not with 2 processes" in message


def test_a_profile_that_would_contradict_the_config_is_refused_with_both_sides(tmp_path, monkeypatch):
    import pytest

    from finetune.memory import profiles
    from finetune.errors import ConfigError

    broken = {**profiles.LORA_PROFILES["low_vram"], ("memory", "weight_dtype"): "bf16"}
    monkeypatch.setitem(profiles.LORA_PROFILES, "low_vram", broken)
    with pytest.raises(ConfigError) as info:
        apply_memory_profile(config(tmp_path, profile="low_vram"))
    message = str(info.value)
    assert "profile = 'low_vram'" in message and "memory.weight_dtype=bf16" in message
    assert "needs training.method = 'full'" in message and "profile = 'custom'" in message


def test_profile_keeps_relative_paths_and_records_what_auto_chose(tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    cfg = config(tmp_path, profile="auto")
    out, _ = apply_memory_profile(cfg, free_gib=7.5)
    assert out.output.dir == cfg.output.dir == tmp_path / "output"  # resolved against the config's folder
    assert out.memory.profile == "low_vram"


def test_profile_keeps_unset_keys_unset_and_softens_what_cannot_work(tmp_path):
    cfg = config(tmp_path, profile="min_vram")
    cfg.lora.variant = "loha"
    out, message = apply_memory_profile(cfg)
    assert out.memory.base_dtype == "bf16" and "cannot train on a quantized base" in message
    assert out.optimizer.betas == (0.9, 0.999)  # the optimizer's own default, resolved with the config


def test_profile_keeps_fp32_base_when_the_user_turned_autocast_off(tmp_path):
    out, message = apply_memory_profile(config(tmp_path, profile="low_vram", mixed_precision="no"))
    assert out.training.mixed_precision == "no" and out.memory.base_dtype == "fp32"
    assert "no autocast" in message


def test_auto_on_resume_keeps_the_profile_the_stopped_run_chose(tmp_path):
    import pytest

    from finetune.config import migrate_moved_keys
    from finetune.errors import CheckpointError
    from finetune.train.checkpoint import TrainState
    from finetune.train.resume import ResumePoint, resume_point, with_checkpoint_profile

    def profile_of_checkpoint(cfg, saved_toml: str):
        point = ResumePoint(cfg.output.checkpoints_dir / "step-000010", TrainState(step=10),
                            migrate_moved_keys(tomllib.loads(saved_toml)))
        return with_checkpoint_profile(cfg, point)

    cfg = config(tmp_path, profile="auto")
    old_release = '[training]\nmemory_profile = "low_vram"\n'  # a key that moved to [memory] since
    assert profile_of_checkpoint(cfg, old_release).memory.profile == "low_vram"
    out, message = apply_memory_profile(profile_of_checkpoint(cfg, old_release), free_gib=80.0)
    assert out.memory.profile == "low_vram" and "set in the config" in message  # free memory ignored
    (tmp_path / "fresh").mkdir()
    fresh = config(tmp_path / "fresh", profile="auto")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):  # --resume with nothing to resume
        resume_point(fresh.output.checkpoints_dir, "latest")
    # a run that auto started without a GPU resumes on one without profile keys appearing mid-run
    out, message = apply_memory_profile(profile_of_checkpoint(cfg, '[memory]\nprofile = "custom"\n'), free_gib=80.0)
    assert out.memory.profile == "custom" and message is None and not out.memory.compile


def test_without_a_profile_a_gpu_keeps_the_lora_base_in_the_autocast_dtype(tmp_path):
    out, message = apply_memory_profile(config(tmp_path), cuda=True)
    assert out.memory.base_dtype == "bf16" and "memory.base_dtype = bf16" in message
    assert apply_memory_profile(config(tmp_path), cuda=False) == (config(tmp_path), None)  # CPU: as written
    kept, _ = apply_memory_profile(config(tmp_path, base_dtype="fp32"), cuda=True)
    assert kept.memory.base_dtype == "fp32"  # the user's own choice
    full, _ = apply_memory_profile(config(tmp_path, method="full"), cuda=True)
    assert full.memory.base_dtype == "fp32"


def test_the_templates_defaults_fit_a_12_gb_card_for_an_sdxl_lora_at_1024(tmp_path):
    """train_config.toml as shipped, on a 12 GB card (about 11.2 GiB free): the pre-flight estimate fits."""
    import shutil
    import tomllib
    from pathlib import Path

    from finetune.config import load_config

    template = Path(__file__).resolve().parents[3] / "train_config.toml"
    shutil.copy(template, tmp_path / "c.toml")
    raw = tomllib.loads(template.read_text(encoding="utf-8"))
    (tmp_path / raw["model"]["pretrained"]).mkdir()
    (tmp_path / raw["dataset"]["subsets"][0]["folder"]).mkdir()
    cfg = load_config(tmp_path / "c.toml")
    assert cfg.memory.profile == "auto" and cfg.dataset.resolution == 1024
    sdxl_unet, lora_rank16_attn = 2_567_463_684, 23_224_320  # SDXL's UNet; rank-16 LoRA on its attention
    for free_gib, limit in ((11.2, 11.0), (7.4, 7.4)):
        out, _ = apply_memory_profile(cfg, free_gib=free_gib)
        memory = out.memory
        estimate = estimate_peak_gib(
            sdxl_unet, lora_rank16_attn, base_dtype=memory.base_dtype, optimizer=out.optimizer.name,
            pixels=1024 * 1024, batch_size=out.training.batch_size,
            checkpointing=memory.checkpointing_mode if memory.gradient_checkpointing else None)
        assert estimate <= limit, (free_gib, out.memory.profile, estimate)
