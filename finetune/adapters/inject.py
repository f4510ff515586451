"""Adding peft adapters to the UNet and text encoders, by target preset."""

from __future__ import annotations

import re

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

    # Per-block ranks: peft matches rank_pattern keys as regexes against module names.
    rank_pattern = {re.escape(prefix) + r"\..*": r for prefix, r in cfg.block_ranks.items()}
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


def add_unet_adapter(unet, cfg) -> None:
    """Inject the configured adapter into `unet` (a diffusers UNet2DConditionModel); only it trains."""
    if cfg.variant in ("loha", "lokr"):
        from finetune.errors import ConfigError

        raise ConfigError(f"lora.variant = {cfg.variant!r} is not supported yet; use 'lora' or 'dora'")
    unet.requires_grad_(False)
    unet.add_adapter(_peft_config(cfg, UNET_TARGETS[cfg.targets], cfg.rank))
    for name, param in unet.named_parameters():
        param.requires_grad = _is_adapter_param(name)


def add_text_encoder_adapters(text_encoders, cfg) -> None:
    """Inject adapters into both CLIP text encoders (attention projections; + MLP for attn_ff/locon)."""
    rank = cfg.text_encoder_rank or cfg.rank
    for encoder in text_encoders:
        encoder.requires_grad_(False)
        encoder.add_adapter(_peft_config(cfg.model_copy(update={"block_ranks": {}}), TE_TARGETS[cfg.targets], rank))
        for name, param in encoder.named_parameters():
            param.requires_grad = _is_adapter_param(name)


def _is_adapter_param(name: str) -> bool:
    return any(tag in name for tag in ("lora_", "hada_", "lokr_", "lora_magnitude_vector"))
