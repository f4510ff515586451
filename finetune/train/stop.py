"""Ctrl-C and SIGTERM during training: finish the current step, save a checkpoint, stop."""

from __future__ import annotations

import signal


class StopFlag:
    """Ctrl-C / SIGTERM ask the loop to save and stop at the end of the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once; the last complete checkpoint stays
            raise KeyboardInterrupt
        self.requested = True
        # On its own line: the progress bar's line has no newline yet.
        print("\nstop requested: saving a checkpoint after this step (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
