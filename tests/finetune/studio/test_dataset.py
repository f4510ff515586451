"""The dataset page's logic: scanning a config, filters, and caption saves that touch only the sidecar."""

from __future__ import annotations

import os

import pytest

from conftest import make_image
from finetune.studio import dataset as ds
from finetune.studio.paths import PathRefused, Workspace


def _config(root, model_dir):
    images = root / "images"
    make_image(images / "wide.png", 32, 128)  # 4:1
    make_image(images / "square.png", 64, 64)
    (images / "wide.txt").write_text("a wide one", encoding="utf-8")
    (images / "square.txt").write_bytes("caf\xe9".encode("cp1252"))  # not UTF-8: a note
    (root / "train.toml").write_text(
        f'[model]\npretrained = "{model_dir}"\n[dataset]\nresolution = 128\nmin_side = 64\nmax_side = 256\n'
        'max_aspect = 1.0\n[[dataset.subsets]]\nfolder = "images"\n[output]\ndir = "out"\n', encoding="utf-8")
    return images


@pytest.fixture
def scanned(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    images = _config(tmp_path, model)
    ws = Workspace(tmp_path)
    return ws, ds.open_dataset(ws, "train.toml"), images


def test_square_plan_crops_the_wide_image_and_lists_notes(scanned):
    ws, view, images = scanned
    assert view.bucket_table() == [["128x128", 1.0, 2]]
    wide = next(i for i, r in enumerate(view.rows) if r["path"] == "wide.png")
    assert view.rows[wide]["cropped"] == pytest.approx(75.0)
    assert ds.filter_rows(view, min_cropped=50) == [wide]
    assert [view.rows[i]["path"] for i in ds.filter_rows(view, kind="non-UTF-8 caption")] == ["square.png"]
    items = ds.page_items(view, ds.filter_rows(view), 1)
    assert all(str(view.thumbs_dir) in path for path, _ in items)
    assert not any(p.suffix == ".png" and "thumb" in p.name for p in images.iterdir())


def test_caption_save_writes_only_the_sidecar(scanned):
    ws, view, images = scanned
    os.chmod(images / "wide.txt", 0o640)
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in images.iterdir()}
    index = next(i for i, r in enumerate(view.rows) if r["path"] == "wide.png")
    path = ds.save_caption(ws, view, index, "a  very\nwide one ")
    assert path == images / "wide.txt"
    assert path.read_text(encoding="utf-8") == "a very wide one\n"
    assert path.stat().st_mode & 0o777 == 0o640  # permissions kept through the temp file
    after = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in images.iterdir()}
    assert set(after) == set(before)
    assert {k for k in after if after[k] != before[k]} == {"wide.txt"}
    assert view.rows[index]["caption"] == "a very wide one"


def test_a_failed_write_leaves_the_old_caption(scanned, monkeypatch):
    ws, view, images = scanned
    index = next(i for i, r in enumerate(view.rows) if r["path"] == "wide.png")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    with pytest.raises(OSError):
        ds.save_caption(ws, view, index, "new text")
    assert (images / "wide.txt").read_text(encoding="utf-8") == "a wide one"
    assert sorted(p.name for p in images.iterdir()) == ["square.png", "square.txt", "wide.png", "wide.txt"]


def test_a_dataset_outside_the_workspace_is_refused(tmp_path):
    inner = tmp_path / "ws"
    inner.mkdir()
    make_image(tmp_path / "elsewhere" / "a.png", 64, 64)
    with pytest.raises(PathRefused, match="outside the workspace"):
        ds.open_dataset(Workspace(inner), "../elsewhere")
