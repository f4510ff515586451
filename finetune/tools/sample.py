"""`finetune sample`: render an image from a saved model, with LoRAs applied unmerged."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import load_file

from finetune.adapters.embedding_files import split_bundled
from finetune.adapters.embeddings import expand_prompt, use_real_eos
from finetune.config import ModelConfig
from finetune.errors import ModelError
from finetune.io import atomic_file, check_output
from finetune.models.load import load_models
from finetune.sampling.pipelines import base_pipeline, render, sampling_dtype
from finetune.tools.refine import check_lora_files, check_sampling


def render_from_model(model_path: Path, prompt: str, out: Path, *, seed: int = 0, steps: int = 20,
                      guidance_scale: float = 5.0, height: int = 1024, width: int = 1024,
                      negative_prompt: str = "", loras: list[tuple[Path, float]] = (), progress: bool = True,
                      overwrite: bool = False, dtype: str | None = None) -> Path:
    """Load a saved SDXL (diffusers folder or single file), apply `loras` (file, scale) without merging,
    and render one PNG, in `dtype` ("fp16", "bf16", "fp32"; default: fp16 on a GPU, fp32 on the CPU).

    Raises:
        ConfigError: `out` exists without `overwrite` or is an input; steps or sizes out of range
            (all checked before any model is loaded).
        ModelError: the model or a LoRA is missing or unreadable.
    """
    check_output(Path(out), overwrite=overwrite, inputs=[Path(model_path), *(Path(p) for p, _ in loras)])
    check_sampling(steps, height, width)
    check_lora_files(loras)
    cuda = torch.cuda.is_available()
    weights_dtype = sampling_dtype(dtype, cuda)
    if progress:
        print(f"loading {model_path}", flush=True)
    models = load_models(ModelConfig(pretrained=model_path), dtype=weights_dtype)
    device = "cuda" if cuda else "cpu"
    pipe = base_pipeline(models, models.unet, device)  # a refiner here: one line naming --refiner
    words = apply_loras(pipe, loras)
    image = render(pipe, [expand_prompt(prompt, words)], [seed], steps=steps, guidance_scale=guidance_scale,
                   height=height, width=width, negative_prompt=negative_prompt, progress=progress)[0]
    with atomic_file(out) as tmp:
        image.save(tmp, format="PNG")
    return out


def apply_loras(pipe, loras) -> list:
    """Load each LoRA file (kohya or diffusers keys) into the pipeline at its scale, unmerged; the
    words a pivotal LoRA bundles join both tokenizers and text encoders. Returns those words."""
    names, scales, words = [], [], []
    check_lora_files(loras)
    for i, (path, scale) in enumerate(loras):
        name = f"lora{i}"
        state, bundled = split_bundled(load_file(str(path)))
        try:
            pipe.load_lora_weights(state, adapter_name=name)  # diffusers refuses the bundle's keys
        except (ValueError, KeyError, RuntimeError) as err:
            raise ModelError(f"{path}: diffusers could not load it as an SDXL LoRA ({err}); is it a LoRA "
                             "for this model?") from None
        for token, vectors in bundled.items():
            for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                                            ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
                pipe.load_textual_inversion(vectors[key], token=token, text_encoder=encoder, tokenizer=tokenizer)
                use_real_eos(encoder)  # SDXL's legacy eos id would pool at the new token
            words.append(SimpleNamespace(token=token, vectors=vectors["clip_l"].shape[0]))
        names.append(name)
        scales.append(scale)
    if names:
        pipe.set_adapters(names, adapter_weights=scales)
    return words
