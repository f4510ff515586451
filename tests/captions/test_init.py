"""captions/__init__.py: the package is plain Python, usable without torch or the model libraries."""

from __future__ import annotations

import subprocess
import sys


def test_import_pulls_in_no_model_libraries():
    code = ("import sys, captions; heavy = [m for m in ('torch', 'transformers', 'diffusers', 'finetune') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_exports():
    import captions

    for name in ("CaptionError", "CaptionResult", "read_sidecar", "read_metadata_jsonl", "resolve_caption",
                 "process_caption", "tag_frequencies", "check_caption_lengths"):
        assert name in captions.__all__ and hasattr(captions, name)
