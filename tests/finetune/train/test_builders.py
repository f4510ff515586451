"""The trainer's builders: compile settings for bucketed shapes."""

from __future__ import annotations

import os

import pytest
import torch

from finetune.train.builders import compile_unet


from conftest import make_tiny_unet as tiny_unet, unet_inputs


def test_compile_keeps_kernels_with_the_caches_unless_the_user_chose_a_folder(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing diffusers leaves
    compiled = compile_unet(tiny_unet(), tmp_path / "compile")
    assert isinstance(compiled, torch._dynamo.eval_frame.OptimizedModule)  # wrapped lazily, nothing built yet
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile")
    assert torch._dynamo.config.cache_size_limit >= 64  # room for one graph per bucket shape

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compile_unet(tiny_unet(), tmp_path / "compile")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


@pytest.mark.gpu
def test_compiled_unet_matches_eager_on_two_bucket_shapes(tmp_path):
    unet = tiny_unet().cuda()
    compiled = compile_unet(unet, tmp_path / "compile")
    for h, w in ((16, 24), (24, 16)):
        x, cond = unet_inputs(unet, h, w, device="cuda")
        with torch.no_grad():
            torch.testing.assert_close(compiled(x, torch.tensor([10], device="cuda"), **cond).sample,
                                       unet(x, torch.tensor([10], device="cuda"), **cond).sample, rtol=1e-3, atol=1e-3)


def test_fsdp_and_the_fused_backward_are_refused_where_they_would_train_wrongly():
    from finetune.config import MemoryConfig, TrainingConfig
    from finetune.errors import ConfigError
    from finetune.train.builders import check_parallelism

    full, plain, fused = TrainingConfig(method="full"), MemoryConfig(), MemoryConfig(fused_backward=True)
    check_parallelism(full, plain, fsdp_version=2, num_processes=2, renders=False)
    check_parallelism(TrainingConfig(method="lora"), plain, fsdp_version=None, num_processes=2, renders=True)
    check_parallelism(full, fused, fsdp_version=None, num_processes=1, renders=True)
    for training, memory, kwargs, words in (
            (TrainingConfig(method="lora"), plain, {}, "--multi_gpu"),
            (full, plain, {"fsdp_version": 1}, "--fsdp_version 2"),
            (full, plain, {"renders": True}, r"sample.prompts = \[\]"),
            (TrainingConfig(method="full", ema_decay=0.99), plain, {}, "training.ema_decay"),
            (TrainingConfig(method="full", train_text_encoder=True), plain, {}, "training.train_text_encoder"),
            (full, fused, {"fsdp_version": None}, "memory.fused_backward = false"),
            (full, fused, {"fsdp_version": 2, "num_processes": 1}, "memory.fused_backward = false")):
        with pytest.raises(ConfigError, match=words):
            check_parallelism(training, memory, **{"fsdp_version": 2, "num_processes": 2, "renders": False, **kwargs})


def test_compile_passes_static_shapes_and_the_mode(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.update(kwargs) or model)
    compile_unet(tiny_unet(), tmp_path / "compile", "reduce-overhead")
    assert seen == {"dynamic": False, "mode": "reduce-overhead"}


@pytest.mark.slow
def test_channels_last_changes_the_layout_not_the_result():
    from finetune.config import LoraConfig, MemoryConfig, TrainingConfig
    from finetune.train.builders import prepare_unet

    outputs = []
    for channels_last in (False, True):
        unet = tiny_unet()
        prepare_unet(unet, TrainingConfig(), MemoryConfig(channels_last=channels_last), LoraConfig(rank=4))
        conv = unet.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        x, cond = unet_inputs(unet)
        with torch.no_grad():
            outputs.append(unet(x, torch.tensor([10]), **cond).sample)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)


def test_block_learning_rates_group_the_trained_parameters_by_the_most_specific_prefix():
    from finetune.config import LoraConfig, MemoryConfig, TrainingConfig
    from finetune.errors import ConfigError
    from finetune.train.builders import prepare_unet, unet_param_groups

    unet = tiny_unet()
    prepare_unet(unet, TrainingConfig(), MemoryConfig(), LoraConfig(rank=4))
    names = {id(p): n for n, p in unet.named_parameters()}
    groups = unet_param_groups(unet, 1e-4, {"up_blocks": 0.5, "up_blocks.1": 2.0, "mid_block": 0.0})
    by_lr = {g["lr"]: [names[id(p)] for p in g["params"]] for g in groups}
    assert set(by_lr) == {1e-4, 0.5e-4, 2e-4, 0.0}
    assert all(n.startswith("up_blocks.1.") for n in by_lr[2e-4])
    assert all(n.startswith("up_blocks.") and not n.startswith("up_blocks.1.") for n in by_lr[0.5e-4])
    assert all(n.startswith("mid_block.") for n in by_lr[0.0])
    assert sum(len(v) for v in by_lr.values()) == sum(p.requires_grad for p in unet.parameters())
    with pytest.raises(ConfigError, match="'down_blocks.9'"):
        unet_param_groups(unet, 1e-4, {"down_blocks.9": 0.5})


def test_lora_plus_gives_the_up_matrices_of_every_group_ratio_times_its_rate():
    from finetune.config import LoraConfig, MemoryConfig, TrainingConfig
    from finetune.train.builders import lora_plus_groups, prepare_unet, unet_param_groups

    unet = tiny_unet()
    prepare_unet(unet, TrainingConfig(), MemoryConfig(), LoraConfig(rank=4))
    names = {id(p): n for n, p in unet.named_parameters()}
    groups = lora_plus_groups(unet_param_groups(unet, 1e-4, {"mid_block": 0.5}), [unet], 16.0)
    by_lr = {g["lr"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert set(by_lr) == {1e-4, 16e-4, 0.5e-4, 8e-4}
    assert all(".lora_B." in n for n in by_lr[16e-4] | by_lr[8e-4])
    assert all(".lora_A." in n for n in by_lr[1e-4] | by_lr[0.5e-4])
    assert all(n.startswith("mid_block.") for n in by_lr[0.5e-4] | by_lr[8e-4])
    trained = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert set().union(*by_lr.values()) == trained and sum(len(v) for v in by_lr.values()) == len(trained)


def test_trained_parts_are_built_from_the_tables_they_read_not_the_whole_config(tmp_path):
    from types import SimpleNamespace

    from finetune.config import LoggingConfig, LoraConfig, MemoryConfig, OptimizerConfig, TrainingConfig
    from finetune.train.builders import build_trained_parts, make_accelerator

    training = TrainingConfig(allow_cpu=True, mixed_precision="no", max_steps=4, learning_rate=1e-3)
    acc = make_accelerator(training, LoggingConfig(), tmp_path)
    models = SimpleNamespace(unet=tiny_unet(), text_encoders=[])  # the UNet trains alone
    parts = build_trained_parts(acc, models, training, MemoryConfig(gradient_checkpointing=False),
                                OptimizerConfig(name="adamw"), LoraConfig(rank=4, alpha=4, max_norm=1.0),
                                renders=False, compile_dir=tmp_path / "compile")
    assert parts.params and all(p.requires_grad and p.dtype == torch.float32 for p in parts.params)
    assert parts.norm_bounded  # lora.max_norm reached the builder through the [lora] table
    assert parts.lr_scheduler.get_last_lr() == [pytest.approx(1e-3)] * len(parts.lr_scheduler.get_last_lr())
