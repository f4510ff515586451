"""The workspace root: every path the studio reads or writes is resolved and must stay inside it.

Paths typed into the studio are taken relative to the workspace; `..` and symlinks are followed by
`Path.resolve` before the check, so neither can lead outside. The studio never deletes a file and
never writes over one the user has (the only write into a user's folder is a caption save).
"""

from __future__ import annotations

from pathlib import Path

from finetune.errors import FinetuneError

# Folder inside the workspace for what the studio itself keeps (thumbnails of bare folders).
STUDIO_DIR = ".finetune-studio"


class PathRefused(FinetuneError):
    """A path leads outside the workspace, or would overwrite a file."""


class Workspace:
    """The root folder given with `--workspace`; `resolve` turns user input into a checked path."""

    def __init__(self, root: Path | str) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise PathRefused(f"--workspace {root}: not a folder; create it or point --workspace at an existing folder")
        self.root = root.resolve()

    def resolve(self, text: str | Path, what: str = "path") -> Path:
        """The absolute, symlink-free path of `text` (relative to the workspace), if it lies inside it.

        Raises:
            PathRefused: empty, or outside the workspace (names the path and the workspace).
        """
        text = str(text).strip()
        if not text:
            raise PathRefused(f"{what}: no path given (a path inside the workspace {self.root})")
        # strict=False: a path that does not exist yet (an output file) still resolves its parents.
        path = (self.root / Path(text).expanduser()).resolve()
        if not path.is_relative_to(self.root):
            raise PathRefused(f"{what}: {text} is outside the workspace {self.root} (after resolving '..' and "
                              f"symlinks it is {path}); use a path inside it, or restart the studio with a "
                              "wider --workspace")
        return path

    def existing(self, text: str | Path, what: str = "path") -> Path:
        """`resolve`, and the path must exist."""
        path = self.resolve(text, what)
        if not path.exists():
            raise PathRefused(f"{what}: {text} does not exist (looked for {path})")
        return path

    def new_output(self, text: str | Path, what: str = "output") -> Path:
        """`resolve`, for a file the studio will create: an existing one is never replaced."""
        path = self.resolve(text, what)
        if path.exists():
            raise PathRefused(f"{what}: {path} already exists; the studio never replaces a file: choose another name")
        return path

    def relative(self, path: Path) -> str:
        """How a path is shown: relative to the workspace where it lies inside it."""
        try:
            return Path(path).resolve().relative_to(self.root).as_posix() or "."
        except ValueError:
            return str(path)

    @property
    def studio_dir(self) -> Path:
        return self.root / STUDIO_DIR
