"""captions/sources.py: sidecar decoding, metadata.jsonl, and the order of caption sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captions import CaptionError, CaptionResult, join_prefix, read_metadata_jsonl, read_sidecar, resolve_caption
from captions.sources import folder_caption, folder_repeats, unused_metadata_lines


def touch_image(path: Path) -> Path:
    # Caption lookup never opens the image, so any bytes do.
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not really a png")
    return path


def write_metadata(folder: Path, *lines: str) -> None:
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


# --- read_sidecar ---------------------------------------------------------------------------------

def test_sidecar_utf8_whitespace_collapsed(tmp_path):
    image = touch_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a photo\nof   a\tdog \r\n", encoding="utf-8")
    assert read_sidecar(image) == ("a photo of a dog", None)


def test_sidecar_bom_stripped(tmp_path):
    image = touch_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfcaf\xc3\xa9 au lait")
    assert read_sidecar(image) == ("café au lait", None)


def test_sidecar_utf16_with_bom(tmp_path):
    image = touch_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("naïve dog".encode("utf-16"))  # Python writes the BOM
    assert read_sidecar(image) == ("naïve dog", None)


def test_sidecar_cp1252_fallback_has_note(tmp_path):
    image = touch_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("café “quoted”".encode("cp1252"))
    text, note = read_sidecar(image)
    assert text == "café “quoted”"
    assert note is not None and "cp1252" in note and str(tmp_path / "a.txt") in note


def test_sidecar_missing_and_other_extension(tmp_path):
    image = touch_image(tmp_path / "a.png")
    assert read_sidecar(image) == (None, None)
    (tmp_path / "a.caption").write_text("from caption file", encoding="utf-8")
    assert read_sidecar(image) == (None, None)
    assert read_sidecar(image, ".caption") == ("from caption file", None)


def test_sidecar_empty_file_noted(tmp_path):
    image = touch_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text(" \n", encoding="utf-8")
    text, note = read_sidecar(image)
    assert text == "" and "empty" in note


def test_sidecar_for_dotted_name(tmp_path):
    image = touch_image(tmp_path / "v1.2.final.jpg")
    (tmp_path / "v1.2.final.txt").write_text("dotted", encoding="utf-8")
    assert read_sidecar(image)[0] == "dotted"


# --- read_metadata_jsonl -------------------------------------------------------------------------

def test_metadata_keys_are_posix_relative(tmp_path):
    write_metadata(tmp_path, json.dumps({"file_name": "a.png", "text": "first"}), "",
                   json.dumps({"file_name": "sub\\b.png", "text": "second\nline", "extra": 1}),
                   json.dumps({"file_name": "./c.png", "text": None}))
    assert read_metadata_jsonl(tmp_path) == {"a.png": "first", "sub/b.png": "second line", "c.png": ""}


def test_metadata_missing_file_is_empty(tmp_path):
    assert read_metadata_jsonl(tmp_path) == {}


def test_metadata_other_text_column(tmp_path):
    write_metadata(tmp_path, json.dumps({"file_name": "a.png", "caption": "x"}))
    assert read_metadata_jsonl(tmp_path, text_column="caption") == {"a.png": "x"}


@pytest.mark.parametrize("bad, words", [
    ("{not json", ["not valid JSON"]),
    ("[1, 2]", ["JSON object"]),
    (json.dumps({"text": "no name"}), ["file_name"]),
    (json.dumps({"file_name": "b.png", "caption": "x"}), ["'text'", "caption"]),
    (json.dumps({"file_name": "b.png", "text": ["a", "b"]}), ["string"]),
    (json.dumps({"file_name": "a.png", "text": "again"}), ["already", "line 1"]),
])
def test_metadata_bad_line_names_file_and_line(tmp_path, bad, words):
    write_metadata(tmp_path, json.dumps({"file_name": "a.png", "text": "ok"}), bad)
    with pytest.raises(CaptionError) as info:
        read_metadata_jsonl(tmp_path)
    message = str(info.value)
    assert f"{tmp_path / 'metadata.jsonl'}:2" in message
    for word in words:
        assert word in message
    assert isinstance(info.value, ValueError)


def test_metadata_not_utf8_names_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "ok"}\n{"file_name": "\xe9"}\n')
    with pytest.raises(CaptionError, match=r"metadata.jsonl:2: not UTF-8"):
        read_metadata_jsonl(tmp_path)


def test_metadata_lines_that_name_no_kept_image_are_each_named(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "broken.png").write_bytes(b"")
    (tmp_path / "notes.md").write_text("not an image")
    write_metadata(tmp_path, *(json.dumps({"file_name": name, "text": "t"}) for name in (
        "./a.png", "gone.png", "../x.png", "/abs/y.png", "notes.md", "broken.png", "sub/../a2.png")))
    unused = dict(unused_metadata_lines(tmp_path, used={"a.png"}, reported={"broken.png"}))
    where = f"{tmp_path / 'metadata.jsonl'}:"
    assert set(unused) == {where + str(n) for n in (2, 3, 4, 5, 7)}  # a.png is used; broken.png already reported
    assert unused[where + "2"].startswith("file_name 'gone.png': no such file in")
    assert "'../x.png' is outside the image folder" in unused[where + "3"]
    assert "'/abs/y.png' is outside the image folder" in unused[where + "4"]
    assert "'notes.md' is not an image this subset trains on" in unused[where + "5"]
    assert "'sub/../a2.png': no such file" in unused[where + "7"]
    assert read_metadata_jsonl(tmp_path)["a2.png"] == "t"  # keys fold ./ and sub/.. as the check does


# --- folder_caption ------------------------------------------------------------------------------

def test_folder_caption_kohya_repeats(tmp_path):
    root = tmp_path / "train"
    assert folder_caption(root / "10_sks dog" / "a.png", root) == "sks dog"
    assert folder_caption(root / "10_sks dog" / "closeups" / "a.png", root) == "sks dog"  # nearest repeats folder
    assert folder_caption(root / "cats" / "a.png", root) == "cats"
    assert folder_caption(root / "a.png", root) == "train"  # the root's own name counts
    kohya_root = tmp_path / "5_ohwx_man"
    assert folder_caption(kohya_root / "a.png", kohya_root) == "ohwx_man"  # kohya keeps underscores


def test_folder_repeats_read_the_same_folder_as_the_caption(tmp_path):
    root = tmp_path / "img"
    assert folder_repeats(root / "10_sks dog" / "closeups" / "a.png", root) == 10
    assert folder_repeats(root / "3_style" / "a.png", root) == 3
    assert folder_repeats(root / "cats" / "a.png", root) is None
    assert folder_repeats(tmp_path / "3_outside" / "data" / "a.png", tmp_path / "3_outside" / "data") is None


def test_folder_caption_does_not_look_above_root(tmp_path):
    root = tmp_path / "3_outside" / "data"
    assert folder_caption(root / "a.png", root) == "data"


# --- resolve_caption: precedence ------------------------------------------------------------------

@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "10_sks dog"
    image = touch_image(root / "img.png")
    return root, image


def test_precedence_sidecar_first(dataset):
    root, image = dataset
    (root / "img.txt").write_text("from sidecar", encoding="utf-8")
    result = resolve_caption(image, root, metadata={"img.png": "from metadata"}, instance_prompt="from prompt")
    assert result == CaptionResult("from sidecar", "sidecar", None)


def test_precedence_metadata_before_prompt(dataset):
    root, image = dataset
    result = resolve_caption(image, root, metadata={"img.png": "from metadata"}, instance_prompt="from prompt")
    assert result == CaptionResult("from metadata", "metadata", None)


def test_precedence_prompt_before_folder(dataset):
    root, image = dataset
    result = resolve_caption(image, root, metadata={"other.png": "x"}, instance_prompt="photo of sks dog")
    assert result == CaptionResult("photo of sks dog", "prompt", None)


def test_regularization_uses_class_prompt(dataset):
    root, image = dataset
    kwargs = dict(instance_prompt="photo of sks dog", class_prompt="photo of a dog")
    assert resolve_caption(image, root, is_regularization=True, **kwargs).text == "photo of a dog"
    assert resolve_caption(image, root, is_regularization=False, **kwargs).text == "photo of sks dog"
    # A regularization image without a class prompt does not borrow the instance prompt.
    result = resolve_caption(image, root, is_regularization=True, instance_prompt="photo of sks dog")
    assert result == CaptionResult("sks dog", "folder", None)


def test_folder_last(dataset):
    root, image = dataset
    assert resolve_caption(image, root) == CaptionResult("sks dog", "folder", None)


def test_empty_when_nothing(tmp_path):
    root = tmp_path / "10_"
    image = touch_image(root / "img.png")
    assert resolve_caption(image, root) == CaptionResult("", "empty", None)


def test_empty_sidecar_is_kept_empty_with_note(dataset):
    root, image = dataset
    (root / "img.txt").write_text("", encoding="utf-8")
    result = resolve_caption(image, root, instance_prompt="photo of sks dog")
    assert (result.text, result.source) == ("", "empty")
    assert "img.txt" in result.note and "empty" in result.note


def test_empty_metadata_caption_noted(dataset):
    root, image = dataset
    result = resolve_caption(image, root, metadata={"img.png": ""}, instance_prompt="photo")
    assert (result.text, result.source) == ("", "empty")
    assert "metadata" in result.note and "img.png" in result.note


def test_metadata_key_for_nested_image_and_relative_root(tmp_path, monkeypatch):
    root = tmp_path / "data"
    image = touch_image(root / "sub" / "img.png")
    assert resolve_caption(image, root, metadata={"sub/img.png": "nested"}).text == "nested"
    monkeypatch.chdir(tmp_path)
    assert resolve_caption(image, Path("data"), metadata={"sub/img.png": "nested"}).text == "nested"


def test_cp1252_note_passes_through(dataset):
    root, image = dataset
    (root / "img.txt").write_bytes("crème".encode("cp1252"))
    result = resolve_caption(image, root)
    assert result.text == "crème" and result.source == "sidecar" and "cp1252" in result.note


def test_image_outside_root_is_a_caption_error(tmp_path):
    image = touch_image(tmp_path / "elsewhere" / "img.png")
    with pytest.raises(CaptionError, match="not inside"):
        resolve_caption(image, tmp_path / "data", metadata={"x.png": "x"})


# --- caption_prefix -------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix, text, expected", [
    ("sks", "a dog", "sks, a dog"),
    ("sks,", "a dog", "sks, a dog"),
    ("sks, ", "a dog", "sks, a dog"),
    ("photo of sks:", "a dog", "photo of sks: a dog"),
    ("sks", "", "sks"),
    ("sks,", "", "sks"),
    ("", "a dog", "a dog"),
    ("sks", "sks, a dog", "sks, a dog"),  # not given twice
    ("sks", "sksx, a dog", "sks, sksx, a dog"),
])
def test_join_prefix(prefix, text, expected):
    assert join_prefix(prefix, text) == expected


def test_prefix_applied_to_every_source(dataset):
    root, image = dataset
    assert resolve_caption(image, root, caption_prefix="ohwx").text == "ohwx, sks dog"
    assert resolve_caption(image, root, caption_prefix="ohwx", instance_prompt="a dog").text == "ohwx, a dog"
    (root / "img.txt").write_text("", encoding="utf-8")
    result = resolve_caption(image, root, caption_prefix="ohwx")
    assert (result.text, result.source) == ("ohwx", "empty")
