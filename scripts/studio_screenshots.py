"""Render the studio's main pages to PNGs (docs/images/studio-*.png) from a demo workspace made on the spot.

The workspace holds drawn images (one 4:1, one too small, one not an image), the tiny model, a config
and a short real training run, so every page has something to show. Needs the studio extra,
Playwright and Chromium (/usr/bin/chromium):

    python scripts/studio_screenshots.py [--out docs/images] [--keep WORKSPACE]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The quickstart's config, longer, with samples and every step logged, so each page has something to show.
SAMPLES = """
[sample]
prompts = ["a red circle, flat colors, simple drawing"]
seeds = [0, 1]
steps = 4
height = 128
width = 128
every_n_steps = 10

[logging]
every_n_steps = 1
"""


def make_workspace(root: Path) -> None:
    """Images, tiny model, config, and one finished run (trained in this process)."""
    from PIL import Image

    from finetune.config import load_config
    from finetune.models.tiny import save_tiny_model
    from finetune.tools.quickstart import draw_images, quickstart_config
    from finetune.train.recipe import train

    images = root / "images"
    draw_images(images, count=14)
    Image.new("RGB", (512, 128), (90, 140, 200)).save(images / "wide_panorama.png")  # 4:1
    (images / "wide_panorama.txt").write_bytes("a blue panorama, caf\xe9 style".encode("cp1252"))  # not UTF-8
    Image.new("RGB", (16, 16), (0, 0, 0)).save(images / "tiny_icon.png")
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    save_tiny_model(root / "tiny-sdxl")
    (root / "train.toml").write_text(quickstart_config(40, name="demo_lora", output_dir="runs/demo", extra=SAMPLES),
                                     encoding="utf-8")
    train(load_config(root / "train.toml"), progress=False)


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def shoot(root: Path, out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    port = _port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "finetune", "studio", "--workspace", str(root), "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    written = []
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.3)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(60_000)
            page.goto(url)
            page.locator("#ds-source textarea").fill("train.toml")
            page.click("#ds-open")
            page.wait_for_selector("#ds-grid img")
            time.sleep(1.5)
            written.append(_save(page, out / "studio-dataset.png"))
            page.get_by_role("tab", name="Config").click()
            page.locator("#cfg-path textarea").fill("train.toml")
            page.click("#cfg-open")
            page.wait_for_function("document.querySelector('#cfg-estimate').innerText.includes('estimated')")
            resolution = page.locator("#cfg-dataset-resolution :is(input, textarea)").first
            resolution.fill("1000")  # not a multiple of bucket_step: the CLI's message shows under the field
            resolution.press("Enter")
            page.wait_for_selector("#err-dataset-resolution:visible")
            page.evaluate("window.scrollTo(0, 0)")
            time.sleep(1)
            written.append(_save(page, out / "studio-config.png"))
            page.get_by_role("tab", name="Runs").click()
            page.wait_for_selector("#run-loss .mark-line path")
            page.wait_for_selector("#run-samples img")
            time.sleep(1.5)
            written.append(_save(page, out / "studio-runs.png"))
            page.get_by_role("tab", name="Tools").click()
            page.locator("#merge-base :is(input, textarea)").first.fill("tiny-sdxl")
            page.locator("#merge-loras textarea").fill("runs/demo/demo_lora.safetensors:0.8")
            page.locator("#merge-out :is(input, textarea)").first.fill("merged-sdxl")
            page.click("#merge-run")
            page.wait_for_function("document.querySelector('#merge-result').innerText.includes('output')")
            written.append(_save(page, out / "studio-tools.png"))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    return written


def _save(page, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=False)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--keep", type=Path, default=None, help="build the workspace here and keep it")
    args = parser.parse_args()
    from finetune.cli import quiet_libraries

    quiet_libraries()
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.keep or Path(tmp) / "workspace").resolve()
        root.mkdir(parents=True, exist_ok=True)
        make_workspace(root)
        for path in shoot(root, args.out.resolve()):
            print(f"written {path}")


if __name__ == "__main__":
    main()
