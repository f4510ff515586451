"""Starting the studio safely: loopback by default, a password required for any other address.

This module imports no Gradio, so `finetune studio` refuses an unsafe bind at once, and says how
to install the extra when Gradio is missing.
"""

from __future__ import annotations

import ipaddress
import os

from finetune.errors import FinetuneError
from finetune.studio.paths import Workspace

# The app (Gradio) is imported only once the bind is checked and Gradio is found (see above).

PASSWORD_ENV = "FINETUNE_STUDIO_PASSWORD"


class StudioRefused(FinetuneError):
    """The studio will not start as asked (an open address without a password, no Gradio)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


def check_bind(host: str, password: str | None) -> None:
    """Refuse to listen beyond this machine without a password.

    Raises:
        StudioRefused: names the address and the two ways to give a password.
    """
    if not is_loopback(host) and not password:
        raise StudioRefused(
            f"--host {host} makes the studio reachable from other machines, and it can start training and "
            f"write files: give a password with --password or the {PASSWORD_ENV} environment variable "
            "(or leave --host at 127.0.0.1)")


def serve(workspace: str, host: str = "127.0.0.1", port: int = 7860, password: str | None = None) -> None:
    """Check the bind, then build and run the studio until interrupted (training runs keep going)."""
    password = password or os.environ.get(PASSWORD_ENV) or None
    check_bind(host, password)

    root = Workspace(workspace)
    try:
        import gradio  # noqa: F401
        import tomlkit  # noqa: F401
    except ImportError as err:
        raise StudioRefused(f"the studio needs {err.name}: pip install -e \".[studio]\" (or pip install "
                            "\"gradio>=5\" tomlkit)") from None
    from finetune.studio.app import launch

    launch(root, host, port, password)
