"""Captions: where an image's caption comes from, per-step tag changes, and length checks."""

from captions.length import check_caption_lengths
from captions.sources import CaptionError, CaptionResult, read_metadata_jsonl, read_sidecar, resolve_caption
from captions.tags import process_caption, tag_frequencies

__all__ = ["CaptionError", "CaptionResult", "check_caption_lengths", "process_caption", "read_metadata_jsonl",
           "read_sidecar", "resolve_caption", "tag_frequencies"]
