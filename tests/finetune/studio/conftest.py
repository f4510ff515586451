"""Fixtures of the studio's browser tests: one workspace, one studio server and one Chromium per session.

A failed browser test leaves a screenshot (its path is printed in the report).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import make_image

REPO = Path(__file__).resolve().parents[3]
CHROMIUM = "/usr/bin/chromium"
TRAIN_TOML = """# a tiny run for the studio's tests
[model]
pretrained = "model"

[dataset]
resolution = 128
min_side = 64
max_side = 256
max_aspect = {max_aspect}

[[dataset.subsets]]
folder = "images"

[training]
max_steps = 4
batch_size = 2
learning_rate = 2e-3
mixed_precision = "no"
seed = 3

[lora]
rank = 4
alpha = 4

[checkpoint]
every_n_steps = 1000

[sample]
prompts = ["a red drawing"]
steps = 2
height = 64
width = 64
every_n_steps = 2

[logging]
every_n_steps = 1

[output]
dir = "{out}"
"""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def studio_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("studio-ws")


@pytest.fixture(scope="session")
def studio_server(studio_root, tmp_path_factory):
    """`finetune studio` on the workspace, as a user starts it, in its own process. Started before the
    workspace is filled: its imports (~5 s) overlap building the tiny model."""
    pytest.importorskip("gradio", reason="the studio needs gradio: pip install -e '.[studio]'")
    port = _free_port()
    log_path = tmp_path_factory.mktemp("studio-log") / "studio.log"
    # This checkout's code, in the studio and in the trainers it starts (not another editable install).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "finetune", "studio", "--workspace", str(studio_root),
                                 "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    yield proc, f"http://127.0.0.1:{port}/", log_path
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="session")
def studio_workspace(studio_root, studio_server, tiny_model_dir) -> Path:
    """Tiny model, a folder of shapes with a 4:1 image, two configs (any plan; square only), a caption folder."""
    root = studio_root
    # A copy, not a link: the studio refuses paths whose real location is outside its workspace.
    shutil.copytree(tiny_model_dir, root / "model")
    for i, (h, w) in enumerate([(96, 160), (160, 96), (128, 128), (112, 144)]):
        make_image(root / "images" / f"{i}.png", h, w, color=(200, 30 * i, 40))
        (root / "images" / f"{i}.txt").write_text(f"a red drawing number {i}", encoding="utf-8")
    make_image(root / "images" / "wide.png", 64, 256, color=(235, 235, 235))  # 4:1
    (root / "images" / "wide.txt").write_text("a wide drawing", encoding="utf-8")
    (root / "train.toml").write_text(TRAIN_TOML.format(max_aspect=4.0, out="runs/first"), encoding="utf-8")
    (root / "square.toml").write_text(TRAIN_TOML.format(max_aspect=1.0, out="runs/square"), encoding="utf-8")
    for i in range(3):
        make_image(root / "captions" / f"c{i}.png", 64, 64 + 32 * i)
        (root / "captions" / f"c{i}.txt").write_text(f"caption {i}", encoding="utf-8")
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def studio_url(studio_server) -> str:
    proc, url, log_path = studio_server
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return url
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the studio did not start; see {log_path}") from None
            time.sleep(0.3)


@pytest.fixture(scope="session")
def chromium():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    executable = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    with sync_api.sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        except Exception as err:  # noqa: BLE001 - whatever keeps Chromium from starting, say it and skip
            pytest.skip(f"no Chromium to drive ({executable or 'not found'}: {str(err).splitlines()[0]}); "
                        "install it with `apt-get install chromium`")
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def studio_tab(chromium, studio_url, studio_workspace):
    """One tab for the session's tests (Gradio's page takes seconds to load on 2 cores); tests switch tabs."""
    context = chromium.new_context(viewport={"width": 1400, "height": 1000})
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    tab.goto(studio_url)
    tab.wait_for_selector("#ds-source")
    yield tab
    context.close()


@pytest.fixture
def page(studio_tab, request, tmp_path_factory):
    """The studio tab, on its first page; on failure a screenshot is saved and named in the report."""
    studio_tab.get_by_role("tab", name="Dataset").click()
    yield studio_tab
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        shots = Path(os.environ.get("STUDIO_SCREENSHOTS", tmp_path_factory.getbasetemp() / "studio-screenshots"))
        shots.mkdir(parents=True, exist_ok=True)
        path = shots / f"{request.node.name}.png"
        studio_tab.screenshot(path=str(path), full_page=True)
        report.sections.append(("studio screenshot", str(path)))
        print(f"\nscreenshot of the failed page: {path}")
