"""finetune/cache/keys.py: identities move with weights, config, dtype and tokenizer; keys with every input."""

from __future__ import annotations

import torch

from finetune.cache import keys


def test_module_identity_is_stable_and_tracks_weights(make_vae):
    a, b, c = make_vae(0), make_vae(0), make_vae(1)
    assert keys.module_identity(a) == keys.module_identity(b)
    assert keys.module_identity(a) != keys.module_identity(c)
    assert keys.vae_identity(a) != keys.vae_identity(a.to(torch.bfloat16))


def test_big_tensor_is_sampled_but_any_sampled_change_counts():
    layer = torch.nn.Linear(1024, 1024)
    before = keys.module_identity(layer)
    with torch.no_grad():
        layer.weight[-1, -1] += 1.0  # in the tail sample
    assert keys.module_identity(layer) != before
    with torch.no_grad():
        layer.weight.mul_(1.01)  # a fine-tune moves everything
    assert keys.module_identity(layer) != before


def test_config_counts(make_vae):
    vae = make_vae(0)
    before = keys.module_identity(vae)
    vae.register_to_config(scaling_factor=0.5)
    assert keys.module_identity(vae) != before


def test_encode_dtype(make_vae):
    vae = make_vae()
    assert keys.vae_encode_dtype(vae) == torch.float32
    assert keys.vae_encode_dtype(vae.half()) == torch.float32  # force_upcast: SDXL's VAE overflows in fp16
    vae.register_to_config(force_upcast=False)
    assert keys.vae_encode_dtype(vae) == torch.float16
    assert keys.vae_encode_dtype(vae.to(torch.bfloat16)) == torch.bfloat16


def test_text_identity_tracks_tokenizers(text_models):
    (tok1, tok2), encoders = text_models
    assert keys.tokenizer_identity(tok1) != keys.tokenizer_identity(tok2)  # pad tokens differ
    assert keys.text_identity((tok1, tok2), encoders) != keys.text_identity((tok1, tok1), encoders)


def test_latent_key_covers_every_input():
    base = dict(fingerprint="f", bucket=(64, 64), crop_top_left=(0, 0), flip=False, vae_id="v",
                dtype="fp16", store_std=True, alpha_color=(255, 255, 255))
    changes = dict(fingerprint="g", bucket=(64, 128), crop_top_left=(0, 8), flip=True, vae_id="w",
                   dtype="fp32", store_std=False, alpha_color=(0, 0, 0))
    seen = {keys.latent_key(**base)}
    for name, value in changes.items():
        seen.add(keys.latent_key(**{**base, name: value}))
    assert len(seen) == len(changes) + 1
    assert keys.latent_key(**base) == keys.latent_key(**{**base, "bucket": [64, 64]})  # list or tuple alike


def test_text_key_covers_every_input():
    base = ("a cat", "t", "truncate", "fp16")
    variants = [("a cat ", "t", "truncate", "fp16"), ("a cat", "u", "truncate", "fp16"),
                ("a cat", "t", "chunk", "fp16"), ("a cat", "t", "truncate", "bf16")]
    assert len({keys.text_key(*v) for v in [base, *variants]}) == 5
