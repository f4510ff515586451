"""Adding peft adapters to the UNet and text encoders, by target preset."""

from __future__ import annotations

import re

import torch

from finetune.errors import ConfigError

# peft is imported where adapters are added: importing it (and transformers) takes a second.

# Linear layers inside SDXL's transformer blocks. "attn" is what diffusers' example trains;
# "attn_ff" is kohya's default set (every Linear of Transformer2DModel); "locon" adds ResNet and
# sampler convs. Never conv_in, time_embedding, add_embedding or conv_out: kohya's loader refuses them.
ATTN = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)"
FF = r"ff\.net\.(0\.proj|2)"
TRANSFORMER = rf"attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.({ATTN}|{FF}))"
UNET_TARGETS = {
    "attn": rf".*transformer_blocks\.\d+\.{ATTN}",
    "attn_ff": rf".*{TRANSFORMER}",
    "locon": rf".*({TRANSFORMER}|resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)",
}
TE_TARGETS = {
    "attn": r".*self_attn\.(q_proj|k_proj|v_proj|out_proj)",
    "attn_ff": r".*(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
    "locon": r".*(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))",
}


def _peft_config(cfg, target_regex: str, rank: int):
    import peft

    # Per-block ranks: peft matches a rank_pattern key as `(.*\.)?(key)$` against module names; the
    # leading `^` pins the prefix to the start of the name ("mid_block" never matches inside another block).
    rank_pattern = {block_pattern(prefix): r for prefix, r in cfg.block_ranks.items()}
    alpha_pattern = {k: cfg.alpha for k in rank_pattern}
    if cfg.variant == "loha":
        return peft.LoHaConfig(r=rank, alpha=cfg.alpha, target_modules=target_regex, rank_dropout=cfg.dropout,
                               rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    if cfg.variant == "lokr":
        return peft.LoKrConfig(r=rank, alpha=cfg.alpha, target_modules=target_regex, rank_dropout=cfg.dropout,
                               rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return peft.LoraConfig(r=rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=target_regex,
                           init_lora_weights=True, use_dora=cfg.variant == "dora",
                           rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)


def block_pattern(prefix: str) -> str:
    """peft pattern for every module at or under the diffusers path `prefix` ("down_blocks.1")."""
    return rf"^{re.escape(prefix)}(\..*)?"


def add_unet_adapter(unet, cfg) -> None:
    """Inject the configured adapter (cfg: finetune.config.LoraConfig) into a diffusers UNet; only it trains.

    Raises:
        ConfigError: a `lora.block_ranks` prefix matches none of the adapted modules.
    """
    target = UNET_TARGETS[cfg.targets]
    targeted = [name for name, _ in unet.named_modules() if re.fullmatch(target, name)]
    for prefix in cfg.block_ranks:
        if not any(re.match(block_pattern(prefix) + "$", name) for name in targeted):
            raise ConfigError(f"lora.block_ranks: {prefix!r} matches no adapted module of lora.targets = "
                              f"{cfg.targets!r}; use a diffusers block path like 'down_blocks.1' or 'mid_block'")
    unet.requires_grad_(False)
    unet.add_adapter(_peft_config(cfg, target, cfg.rank))
    _train_adapter_only(unet)


def add_text_encoder_adapters(text_encoders, cfg) -> None:
    """Inject adapters into both CLIP text encoders (attention projections; + MLP for attn_ff/locon)."""
    rank = cfg.text_encoder_rank or cfg.rank
    config = cfg.model_copy(update={"block_ranks": {}})  # block paths name UNet blocks only
    for encoder in text_encoders:
        encoder.requires_grad_(False)
        encoder.add_adapter(_peft_config(config, TE_TARGETS[cfg.targets], rank))
        _train_adapter_only(encoder)


def _train_adapter_only(model) -> None:
    # Adapter weights train in fp32 whatever the base weights' dtype (bf16 updates would round away).
    for name, param in model.named_parameters():
        param.requires_grad = _is_adapter_param(name)
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def _is_adapter_param(name: str) -> bool:
    return any(tag in name for tag in ("lora_", "hada_", "lokr_"))
