"""The studio's page: four tabs (Dataset, Config, Runs, Tools) built into one gr.Blocks, and its launch."""

from __future__ import annotations

import hmac
import threading
import time

import gradio as gr
import httpx
from gradio import networking

from finetune.studio import page_config, page_dataset, page_runs, tools
from finetune.studio.paths import Workspace

CSS = """
.field-error { color: #b42318; font-size: 0.9em; margin-top: -6px; }
#ds-grid .caption-label { white-space: normal; font-size: 11px; }
"""


def build_app(workspace: Workspace) -> gr.Blocks:
    with gr.Blocks(title="finetune studio", analytics_enabled=False) as demo:
        gr.Markdown(f"## finetune studio\nworkspace: `{workspace.root}`: every path is relative to it and "
                    "stays inside it.")
        with gr.Tabs():
            with gr.Tab("Dataset", id="dataset") as dataset_tab:
                page_dataset.build(workspace)
            with gr.Tab("Config", id="config") as config_tab:
                page_config.build(workspace)
            with gr.Tab("Runs", id="runs") as runs_tab:
                timer, sent = page_runs.build(workspace, demo)
            with gr.Tab("Tools", id="tools") as tools_tab:
                tools.build(workspace)
        # The runs refresh ticks only while its tab is shown; on showing it, everything is sent afresh
        # (values sent while the tab was not yet drawn may not have reached it).
        runs_tab.select(lambda: (gr.Timer(active=True), {}), None, [timer, sent])
        for other in (dataset_tab, config_tab, tools_tab):
            other.select(lambda: gr.Timer(active=False), None, timer)
    # The page is the interface, not an API: private events are left out of the API description that
    # the page downloads (3.3 MB for the config form's ~240 events) and cannot be called by API clients.
    for fn in demo.fns.values():
        fn.api_visibility = "private"
    return demo


def warm_up() -> None:
    """Import what the estimate and the tools need while the user looks at the first page (5-8 s cold)."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401

    from finetune.train import builders  # noqa: F401


def password_check(password: str):
    """Gradio auth: any user name, this password (compared in constant time)."""
    def check(_user: str, given: str) -> bool:
        return hmac.compare_digest(given.encode(), password.encode())
    return check


def _patient_url_ok(url: str) -> bool:
    """Gradio's start-up self-check, with time to answer: its own gives up after one 3 s request, and on a
    busy 2-core machine (a training run beside it) the first page of this large UI can take longer."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.head(url, timeout=15).status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return False


def launch(workspace: Workspace, host: str, port: int, password: str | None) -> None:
    networking.url_ok = _patient_url_ok
    demo = build_app(workspace)
    demo.queue(default_concurrency_limit=4)
    print(f"finetune studio on http://{host}:{port} (workspace {workspace.root}); Ctrl-C closes the studio, "
          "training runs keep going", flush=True)
    demo.launch(server_name=host, server_port=port, auth=password_check(password) if password else None,
                # Gradio serves only files under these: thumbnails, samples and tool outputs all live there.
                allowed_paths=[str(workspace.root)], show_error=True, quiet=True, css=CSS,
                footer_links=[], ssr_mode=False, prevent_thread_lock=True)
    # After the server answers: Gradio checks that it can reach itself, and heavy imports starve that check.
    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    demo.block_thread()
