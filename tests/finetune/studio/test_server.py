"""Binding: loopback by default; any other address needs a password, and the CLI refuses without one."""

from __future__ import annotations

import pytest

from finetune.studio.server import StudioRefused, check_bind, is_loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_nothing(host):
    assert is_loopback(host)
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.5", "myhost"])
def test_open_address_needs_a_password(host):
    with pytest.raises(StudioRefused, match="--password or the FINETUNE_STUDIO_PASSWORD"):
        check_bind(host, None)
    check_bind(host, "s3cret")


def test_cli_refuses_to_start_on_0000_without_a_password(tmp_path, monkeypatch, capsys):
    from finetune.cli import main

    monkeypatch.delenv("FINETUNE_STUDIO_PASSWORD", raising=False)
    # The command's own entry point, in-process: it refuses before importing Gradio or binding a port.
    assert main(["studio", "--workspace", str(tmp_path), "--host", "0.0.0.0", "--port", "7999"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --host 0.0.0.0 makes the studio reachable") and "--password" in err


def test_nothing_else_imports_the_studio():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[3] / "finetune"
    for path in root.rglob("*.py"):
        if "studio" in path.relative_to(root).parts:
            continue
        text = path.read_text(encoding="utf-8")
        if path.name == "cli.py":
            assert "from finetune.studio.server import serve" in text  # lazily, in cmd_studio only
            continue
        assert "finetune.studio" not in text, path
