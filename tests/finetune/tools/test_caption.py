"""finetune/autocaption.py: sidecar captions from a local image-to-text model, never clobbering existing ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_image

from finetune.tools import caption as autocaption
from finetune.tools.caption import CaptionStats, caption_folder, format_stats
from finetune.errors import ConfigError, DatasetError, ModelError


class FakeCaptioner:
    """Stands in for a model: captions each image by its size, records the batch sizes it saw."""

    def __init__(self, empty_for_width: int | None = None):
        self.batches: list[int] = []
        self.empty_for_width = empty_for_width

    def __call__(self, images):
        self.batches.append(len(images))
        return ["" if im.width == self.empty_for_width else f"  image\n{im.height}x{im.width} " for im in images]


@pytest.fixture
def fake(monkeypatch):
    captioner = FakeCaptioner()
    monkeypatch.setattr(autocaption.Captioner, "load", classmethod(lambda cls, *a, **k: captioner))
    return captioner


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A folder that passes the path check (the fake captioner never reads it)."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "blip"}), encoding="utf-8")
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    make_image(folder / "a.png", 40, 60)
    make_image(folder / "b.jpg", 50, 30)
    make_image(folder / "sub" / "c.webp", 32, 32)
    make_image(folder / "sub" / "deeper" / "d.bmp", 20, 24)
    (folder / "notes.md").write_text("not an image", encoding="utf-8")
    return folder


def test_writes_a_caption_beside_every_image(photos, model_dir, fake):
    stats = caption_folder(photos, model_dir, batch_size=3)
    assert stats == CaptionStats(written=4, skipped_existing=0, failed=0)
    assert (photos / "a.txt").read_text(encoding="utf-8") == "image 40x60"  # whitespace collapsed
    assert (photos / "sub" / "deeper" / "d.txt").read_text(encoding="utf-8") == "image 20x24"
    assert fake.batches == [3, 1]
    assert not list(photos.rglob("*.tmp"))  # atomic writes leave no temp files


def test_existing_captions_untouched_unless_overwrite(photos, model_dir, fake):
    (photos / "a.txt").write_text("hand written", encoding="utf-8")
    stats = caption_folder(photos, model_dir)
    assert (stats.written, stats.skipped_existing) == (3, 1)
    assert (photos / "a.txt").read_text(encoding="utf-8") == "hand written"
    assert "--overwrite" in format_stats(stats)

    stats = caption_folder(photos, model_dir, overwrite=True)
    assert (stats.written, stats.skipped_existing) == (4, 0)
    assert (photos / "a.txt").read_text(encoding="utf-8") == "image 40x60"


def test_nothing_to_do_does_not_load_the_model(photos, model_dir, monkeypatch):
    for image in [p for p in photos.rglob("*") if p.suffix in (".png", ".jpg", ".webp", ".bmp")]:
        image.with_suffix(".caption").write_text("done", encoding="utf-8")

    def refuse(*args, **kwargs):
        raise AssertionError("model loaded with nothing to caption")

    monkeypatch.setattr(autocaption.Captioner, "load", classmethod(refuse))
    assert caption_folder(photos, model_dir, caption_ext=".caption") == CaptionStats(0, 4, 0)


def test_caption_ext_and_prefix(photos, model_dir, fake):
    caption_folder(photos, model_dir, caption_ext=".caption", prefix="sks")
    assert (photos / "b.caption").read_text(encoding="utf-8") == "sks, image 50x30"
    assert not (photos / "b.txt").exists()


def test_broken_image_and_empty_caption_fail_alone(photos, model_dir, monkeypatch):
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    captioner = FakeCaptioner(empty_for_width=30)
    monkeypatch.setattr(autocaption.Captioner, "load", classmethod(lambda cls, *a, **k: captioner))
    stats = caption_folder(photos, model_dir)
    assert (stats.written, stats.failed) == (3, 2)
    reasons = dict(stats.failures)
    assert "cannot be decoded" in reasons[str(photos / "broken.png")]
    assert "empty caption" in reasons[str(photos / "b.jpg")]
    assert not (photos / "broken.txt").exists() and not (photos / "b.txt").exists()
    report = format_stats(stats)
    assert "2 failed" in report and "broken.png" in report


def test_images_sharing_a_caption_file(tmp_path, model_dir, fake):
    folder = tmp_path / "photos"
    make_image(folder / "x.jpg", 16, 16)
    make_image(folder / "x.png", 24, 24)
    stats = caption_folder(folder, model_dir)
    assert (stats.written, stats.failed) == (1, 1)
    assert "shares x.txt with x.jpg" in stats.failures[0][1]
    assert (folder / "x.txt").read_text(encoding="utf-8") == "image 16x16"


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "not found"),
    (lambda p: p.mkdir(), "no config.json"),
])
def test_bad_model_path(photos, tmp_path, setup, match):
    model = tmp_path / "missing-model"
    setup(model)
    with pytest.raises(ModelError, match=match) as info:
        caption_folder(photos, model)
    assert str(model) in str(info.value)
    assert not list(photos.rglob("*.txt"))


def test_bad_folder_and_arguments(tmp_path, model_dir):
    with pytest.raises(DatasetError, match="not found"):
        caption_folder(tmp_path / "nope", model_dir)
    with pytest.raises(ConfigError, match="caption_ext"):
        caption_folder(tmp_path, model_dir, caption_ext="txt")
    with pytest.raises(ConfigError, match="batch_size"):
        caption_folder(tmp_path, model_dir, batch_size=0)


def test_format_stats_lists_a_few_failures():
    failures = tuple((f"img{i}.png", "cannot be decoded") for i in range(13))
    text = format_stats(CaptionStats(written=2, skipped_existing=0, failed=13, failures=failures))
    assert text.startswith("wrote 2 caption file(s); kept 0 existing; 13 failed")
    assert "img9.png" in text and "img10.png" not in text and "and 3 more" in text


# --- real (tiny, random) transformers models, built offline -------------------------------------------

WORDS = [f"w{i}" for i in range(40)]


def save_tiny_vision_encoder_decoder(path: Path) -> Path:
    """ViT encoder + GPT-2 decoder, a PIL image processor and a word-level tokenizer: no combined processor."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (GPT2Config, PreTrainedTokenizerFast, ViTConfig, VisionEncoderDecoderConfig,
                              VisionEncoderDecoderModel)
    from transformers.models.vit import ViTImageProcessorPil

    vocab = ["<pad>", "<s>", "</s>", "<unk>", *WORDS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>")
    encoder = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        image_size=32, patch_size=8)
    decoder = GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, n_positions=64,
                         bos_token_id=1, eos_token_id=2)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = 1, 0
    torch.manual_seed(0)
    model = VisionEncoderDecoderModel(config)
    model.generation_config.decoder_start_token_id = 1
    model.generation_config.pad_token_id = 0
    # A random model may emit only special tokens (an empty caption); the test wants words.
    model.generation_config.suppress_tokens = [0, 1, 2, 3]
    model.save_pretrained(path)
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_blip(path: Path) -> Path:
    """BlipForConditionalGeneration with a BlipProcessor (PIL image processor + BERT tokenizer from a dict)."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessorPil

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, bos_token="[DEC]")
    tiny = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config = BlipConfig(vision_config=dict(**tiny, image_size=32, patch_size=8),
                        text_config=dict(**tiny, vocab_size=len(vocab), max_position_embeddings=64, bos_token_id=5,
                                         pad_token_id=0, sep_token_id=3, eos_token_id=3),
                        projection_dim=16, image_text_hidden_size=16)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    model.generation_config.suppress_tokens = list(range(6))
    model.save_pretrained(path)
    BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_captioners(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("captioners")
    return {"vision-encoder-decoder": save_tiny_vision_encoder_decoder(root / "ved"),
            "blip": save_tiny_blip(root / "blip")}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vision-encoder-decoder", "blip"])
def test_real_tiny_model_writes_captions(tiny_captioners, photos, kind):
    (photos / "a.txt").write_text("hand written", encoding="utf-8")
    stats = caption_folder(photos, tiny_captioners[kind], batch_size=2, max_new_tokens=4, prefix="sks")
    assert stats == CaptionStats(written=3, skipped_existing=1, failed=0)
    assert (photos / "a.txt").read_text(encoding="utf-8") == "hand written"
    for name in ("b.txt", "sub/c.txt", "sub/deeper/d.txt"):
        words = (photos / name).read_text(encoding="utf-8").split(", ", 1)
        assert words[0] == "sks"
        assert 1 <= len(words[1].split()) <= 4 and set(words[1].split()) <= set(WORDS)

    stats = caption_folder(photos, tiny_captioners[kind], overwrite=True, max_new_tokens=3)
    assert (stats.written, stats.skipped_existing) == (4, 0)
    assert (photos / "a.txt").read_text(encoding="utf-8") != "hand written"


@pytest.mark.slow
def test_not_an_image_to_text_model(tmp_path, photos):
    from transformers import BertConfig

    BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
               vocab_size=50).save_pretrained(tmp_path / "bert")
    with pytest.raises(ModelError, match=r"cannot load 'bert' as an image-to-text model") as info:
        caption_folder(photos, tmp_path / "bert")
    assert str(tmp_path / "bert") in str(info.value)
    assert not list(photos.rglob("*.txt"))


@pytest.mark.slow
def test_prompt_goes_through_a_combined_processor(tiny_captioners, tmp_path):
    folder = tmp_path / "one"
    make_image(folder / "a.png", 40, 60)
    stats = caption_folder(folder, tiny_captioners["blip"], prompt="w1 w2", max_new_tokens=3)
    assert stats.written == 1
    assert set((folder / "a.txt").read_text(encoding="utf-8").split()) <= set(WORDS)
    with pytest.raises(ModelError, match="takes no prompt"):
        caption_folder(folder, tiny_captioners["vision-encoder-decoder"], prompt="w1", overwrite=True)


def test_mask_files_are_not_captioned(tmp_path):
    from PIL import Image

    from finetune.tools.caption import plan_captions

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (8, 8)).save(tmp_path / "a_mask.png")
    todo, skipped, failures = plan_captions(tmp_path, ".txt", overwrite=False)
    assert [image.name for image, _ in todo] == ["a.png"]
