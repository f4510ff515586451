"""Sidecar captions for a folder of images, written by a local transformers image-to-text model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from bucketing.image import open_image
from bucketing.scan import split_masks, walk_images
from captions.sources import clean_caption, join_prefix
from finetune.errors import ConfigError, DatasetError, ModelError
from finetune.io import write_text_atomic

# transformers is imported where the caption model loads: importing it takes a second.

# Models that caption only when told the task; the processor turns the tag into its instruction.
TASK_PROMPTS = {"florence2": "<DETAILED_CAPTION>"}
FAILURES_SHOWN = 10  # format_stats lists this many failed images, then a count


@dataclass(frozen=True)
class CaptionStats:
    written: int = 0
    skipped_existing: int = 0
    failed: int = 0
    failures: tuple[tuple[str, str], ...] = ()  # (image path, reason), one per failed image


def caption_folder(folder: Path, model_path: Path, *, overwrite: bool = False, caption_ext: str = ".txt",
                   batch_size: int = 4, max_new_tokens: int = 40, prefix: str = "", prompt: str | None = None,
                   device: str | None = None) -> CaptionStats:
    """Write `<image stem><caption_ext>` beside every image under `folder` (recursively).

    An existing caption file is left alone unless `overwrite`. Each file is written atomically. An image
    that cannot be decoded, or for which the model returns nothing, is counted as failed; the rest go on.

    Args:
        model_path: a local folder saved with `save_pretrained` (BLIP, GIT, Florence-2, a
            VisionEncoderDecoder, ...); nothing is downloaded.
        prefix: put before every caption as the dataset's caption_prefix is ("sks, a dog ...").
        prompt: text given to the model with each image; Florence-2 gets its captioning task by default.
        device: "cuda", "cpu", ...; the default is the GPU when there is one.

    Raises:
        DatasetError: `folder` is not a folder.
        ModelError: `model_path` is missing, has no config.json, or is not an image-to-text model.
        ConfigError: `caption_ext`, `batch_size` or `max_new_tokens` is unusable.
    """
    folder, model_path = Path(folder), Path(model_path)
    _check_arguments(caption_ext, batch_size, max_new_tokens)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: image folder not found")
    check_model_path(model_path)  # before the scan, so a typo in --model fails at once
    todo, skipped, failures = plan_captions(folder, caption_ext, overwrite)
    written = 0
    if todo:
        captioner = Captioner.load(model_path, device=device, prompt=prompt, max_new_tokens=max_new_tokens)
        for batch in _progress([todo[i:i + batch_size] for i in range(0, len(todo), batch_size)], len(todo)):
            done, failed = _caption_batch(captioner, batch, prefix)
            written += done
            failures.extend(failed)
    return CaptionStats(written, skipped, len(failures), tuple(failures))


def _check_arguments(caption_ext: str, batch_size: int, max_new_tokens: int) -> None:
    if not caption_ext.startswith(".") or len(caption_ext) < 2 or "/" in caption_ext:
        raise ConfigError(f"caption_ext = {caption_ext!r}: must be an extension with its dot, e.g. .txt")
    if batch_size < 1:
        raise ConfigError(f"batch_size = {batch_size}: must be >= 1")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens = {max_new_tokens}: must be >= 1")


def check_model_path(model_path: Path) -> None:
    """Raise ModelError unless `model_path` is a local model folder with a config.json."""
    if not model_path.exists():
        raise ModelError(f"{model_path}: captioning model not found; pass a local folder saved with "
                         "save_pretrained (models are never downloaded)")
    if not (model_path / "config.json").is_file():
        raise ModelError(f"{model_path}: no config.json; pass the folder that holds the model's config.json, "
                         "weights and processor files")


def plan_captions(folder: Path, caption_ext: str, overwrite: bool
                  ) -> tuple[list[tuple[Path, Path]], int, list[tuple[str, str]]]:
    """([(image, caption file) to write], number skipped for an existing caption, [(image, reason)])."""
    paths, problems = walk_images(folder)
    images, _ = split_masks(paths)  # a mask beside an image is not an image to caption
    failures = [(path, reason) for path, reason in problems]
    todo, skipped, owner = [], 0, {}
    for image in images:
        target = image.with_suffix(caption_ext)
        if target in owner:
            # "a.png" and "a.jpg" share "a.txt": training would give both the first one's caption.
            failures.append((str(image), f"shares {target.name} with {owner[target].name}; rename one of them"))
            continue
        owner[target] = image
        if target.is_dir():  # never replaced, --overwrite or not
            failures.append((str(image), f"{target} is a folder where its caption file would go; rename it"))
        elif target.exists() and not overwrite:
            skipped += 1
        else:
            todo.append((image, target))
    return todo, skipped, failures


def _caption_batch(captioner: Captioner, batch: list[tuple[Path, Path]], prefix: str
                   ) -> tuple[int, list[tuple[str, str]]]:
    """Caption one batch; returns (files written, [(image, reason)] for the images that failed)."""
    opened, failures = [], []
    for image_path, target in batch:
        try:
            opened.append((image_path, target, open_image(image_path)))
        except Exception as err:  # noqa: BLE001 - any decoder error (OSError, DecompressionBomb...) skips one image
            failures.append((str(image_path), f"cannot be decoded ({_first_line(err)})"))
    texts = captioner([image for _, _, image in opened]) if opened else []
    written = 0
    for (image_path, target, _), text in zip(opened, texts):
        text = clean_caption(text)
        if not text:
            failures.append((str(image_path), "the model returned an empty caption; no file written"))
            continue
        write_text_atomic(target, join_prefix(prefix, text))
        written += 1
    return written, failures


def _progress(batches: list, total: int):
    """Yield `batches` with a progress bar counted in images (hidden when stderr is not a terminal)."""
    with tqdm(total=total, unit="image", desc="captioning", disable=None) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch))


class Captioner:
    """A loaded image-to-text model: call it with PIL images, get one caption each."""

    def __init__(self, model, processor, image_processor, tokenizer, prompt: str | None, max_new_tokens: int):
        self.model, self.processor = model, processor
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.prompt, self.max_new_tokens = prompt, max_new_tokens

    @classmethod
    def load(cls, model_path: Path, *, device: str | None = None, prompt: str | None = None,
             max_new_tokens: int = 40) -> Captioner:
        """Load model and processor from `model_path` only (local_files_only; no remote code)."""
        from transformers import AutoConfig, AutoModelForImageTextToText

        check_model_path(model_path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # bf16 halves GPU memory with fp32's range; CPUs run fp32 faster and without surprises.
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
        try:
            config = AutoConfig.from_pretrained(model_path, local_files_only=True)
            model = AutoModelForImageTextToText.from_pretrained(model_path, local_files_only=True, dtype=dtype)
        except (OSError, ValueError, KeyError) as err:
            kind = _model_type(model_path)
            raise ModelError(f"{model_path}: cannot load {kind!r} as an image-to-text model ({_first_line(err)}); "
                             "use a model that transformers' AutoModelForImageTextToText loads, such as BLIP, "
                             "GIT or Florence-2 saved with a current transformers") from None
        model.to(device).eval()
        processor, image_processor, tokenizer = _load_processors(model_path)
        prompt = prompt if prompt is not None else TASK_PROMPTS.get(config.model_type)
        if prompt and processor is None:
            raise ModelError(f"{model_path}: this model has no combined processor, so it takes no prompt; "
                             "leave the prompt out")
        return cls(model, processor, image_processor, tokenizer, prompt, max_new_tokens)

    def __call__(self, images: Sequence) -> list[str]:
        if self.processor is not None:
            text = [self.prompt] * len(images) if self.prompt else None
            inputs = self.processor(images=list(images), text=text, return_tensors="pt")
        else:
            inputs = self.image_processor(images=list(images), return_tensors="pt")
        # BatchFeature.to casts only floating tensors (pixel values), never token ids.
        inputs = inputs.to(self.model.device, dtype=self.model.dtype)
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        output = _strip_prompt(output, inputs.get("input_ids"), self.model.config.is_encoder_decoder)
        decoder = self.processor if self.processor is not None else self.tokenizer
        return decoder.batch_decode(output, skip_special_tokens=True)


def _load_processors(model_path: Path):
    """(processor, image_processor, tokenizer): a combined processor when the model ships one (BLIP,
    Florence-2), else a separate image processor and tokenizer (VisionEncoderDecoder)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, ProcessorMixin

    try:
        processor = AutoProcessor.from_pretrained(model_path, local_files_only=True)
        if isinstance(processor, ProcessorMixin):
            return processor, None, None
        return None, AutoImageProcessor.from_pretrained(model_path, local_files_only=True), \
            AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ModelError(f"{model_path}: no usable image processor and tokenizer ({_first_line(err)}); the folder "
                         "needs preprocessor_config.json (or processor_config.json) and tokenizer files") from None


def _strip_prompt(output, input_ids, is_encoder_decoder: bool):
    """Decoder-only models (GIT, chat models) echo the prompt ids before the caption: cut them off."""
    if is_encoder_decoder or input_ids is None or output.shape[1] < input_ids.shape[1]:
        return output
    head = output[:, :input_ids.shape[1]]
    return output[:, input_ids.shape[1]:] if bool((head == input_ids.to(head.device)).all()) else output


def _model_type(model_path: Path) -> str:
    try:
        return str(json.loads((model_path / "config.json").read_text(encoding="utf-8")).get("model_type", "unknown"))
    except (OSError, ValueError, AttributeError):
        return "unknown"


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def format_stats(stats: CaptionStats) -> str:
    """A short report for the CLI: counts, then the failed images with reasons."""
    lines = [f"wrote {stats.written} caption file(s); kept {stats.skipped_existing} existing"
             + (" (--overwrite replaces them)" if stats.skipped_existing else "")
             + f"; {stats.failed} failed"]
    for path, reason in stats.failures[:FAILURES_SHOWN]:
        lines.append(f"  {path}: {reason}")
    if len(stats.failures) > FAILURES_SHOWN:
        lines.append(f"  ... and {len(stats.failures) - FAILURES_SHOWN} more")
    return "\n".join(lines)
