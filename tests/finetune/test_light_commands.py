"""Light commands start at once: `--help`, `dataset inspect`/`build` and the studio's start never import
torch, diffusers or transformers (seconds each), checked in a fresh process as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import make_image
from finetune.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers")

# Runs each command through `finetune.cli.main` in one process; after each, the heavy libraries loaded so far
# (the first command that lists one is the one that imported it).
SCRIPT = textwrap.dedent("""
    import contextlib, io, json, sys
    from finetune.cli import main

    class Started(Exception):
        pass

    def refuse_to_serve(*args, **kwargs):
        raise Started  # the studio's page is built: stop before it listens

    if {studio}:
        import gradio
        gradio.Blocks.launch = refuse_to_serve
    for argv in json.loads(sys.argv[1]):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            try:
                code = main(argv)
            except SystemExit as done:  # --help
                code = done.code
            except Started:
                code = "started"
        loaded = [name for name in {heavy!r} if name in sys.modules]
        print(json.dumps([argv, code, loaded, out.getvalue()[-2000:]]))
""")


def _run(commands: list[list[str]], studio: bool = False) -> list[list]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(studio=studio, heavy=HEAVY), json.dumps(commands)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("[")]


def _config(tmp_path: Path) -> Path:
    images = tmp_path / "images"
    for i, (h, w) in enumerate([(96, 160), (160, 96), (128, 128)]):
        make_image(images / f"{i}.png", h, w, color=(200, 40 * i, 40))
        (images / f"{i}.txt").write_text(f"a drawing number {i}", encoding="utf-8")
    (tmp_path / "model").mkdir()  # the dataset commands check that it exists, never what it holds
    path = tmp_path / "cfg.toml"
    path.write_text(f'[model]\npretrained = "{tmp_path / "model"}"\n[dataset]\nresolution = 128\nmin_side = 64\n'
                    f'[[dataset.subsets]]\nfolder = "{images}"\n[output]\ndir = "{tmp_path / "out"}"\n',
                    encoding="utf-8")
    return path


def _subcommands() -> list[list[str]]:
    """Every command path of the parser: ["train"], ["dataset"], ["dataset", "inspect"], ..."""
    found = []

    def walk(parser, prefix):
        for action in parser._actions:
            if action.choices and hasattr(action, "_name_parser_map"):
                for name, sub in action.choices.items():
                    found.append([*prefix, name])
                    walk(sub, [*prefix, name])

    walk(build_parser(), [])
    return found


def test_help_and_the_dataset_commands_never_import_torch_diffusers_or_transformers(tmp_path):
    config = str(_config(tmp_path))
    helps = [["--help"]] + [[*path, "--help"] for path in _subcommands()]
    assert len(helps) > 12  # every subcommand, and dataset's two actions
    results = _run([*helps, ["dataset", "inspect", config], ["dataset", "build", config]])
    assert [argv for argv, *_ in results] == [*helps, ["dataset", "inspect", config], ["dataset", "build", config]]
    for argv, code, loaded, out in results:
        assert code == 0, (argv, out)
        assert loaded == [], f"finetune {' '.join(argv)} imported {loaded}"
    assert "buckets used" in results[-2][3] and "plan:" in results[-2][3] and "manifest:" in results[-1][3]


@pytest.mark.slow  # importing Gradio alone takes 4-8 s on 2 cores
def test_the_studio_starts_without_torch_diffusers_or_transformers(tmp_path):
    pytest.importorskip("gradio")
    _config(tmp_path)  # a workspace with a config and images in it
    [(argv, code, loaded, out)] = _run([["studio", "--workspace", str(tmp_path)]], studio=True)
    assert code == "started", out
    assert loaded == [], f"the studio's start imported {loaded}"
