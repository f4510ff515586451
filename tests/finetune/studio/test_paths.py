"""Workspace confinement: no `..` escape, no symlink escape, outputs never replace a file."""

from __future__ import annotations

import pytest

from finetune.studio.paths import PathRefused, Workspace


def test_inside_paths_resolve(tmp_path):
    (tmp_path / "data").mkdir()
    ws = Workspace(tmp_path)
    assert ws.resolve("data") == (tmp_path / "data").resolve()
    assert ws.resolve(str(tmp_path / "data" / "new.txt")) == (tmp_path / "data" / "new.txt").resolve()
    assert ws.resolve("data/../data/x") == (tmp_path / "data" / "x").resolve()


@pytest.mark.parametrize("text", ["..", "../outside", "data/../../outside", "/etc/passwd", "~"])
def test_escapes_are_refused(tmp_path, text):
    (tmp_path / "ws" / "data").mkdir(parents=True)
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(PathRefused, match="outside the workspace"):
        ws.resolve(text)


def test_symlink_out_of_the_workspace_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("x")
    root = tmp_path / "ws"
    root.mkdir()
    (root / "link").symlink_to(outside)
    ws = Workspace(root)
    with pytest.raises(PathRefused, match="outside the workspace"):
        ws.resolve("link/secret.txt")


def test_new_output_never_replaces_a_file(tmp_path):
    (tmp_path / "have.safetensors").write_bytes(b"x")
    ws = Workspace(tmp_path)
    with pytest.raises(PathRefused, match="already exists"):
        ws.new_output("have.safetensors")
    assert ws.new_output("new.safetensors").name == "new.safetensors"


def test_missing_workspace_and_empty_path(tmp_path):
    with pytest.raises(PathRefused, match="not a folder"):
        Workspace(tmp_path / "nope")
    with pytest.raises(PathRefused, match="no path given"):
        Workspace(tmp_path).resolve("  ")
