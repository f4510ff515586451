"""Captions: where an image's caption comes from, per-step tag changes, and length checks."""

from captions.length import check_caption_lengths
from captions.sources import (CaptionError, CaptionResult, clean_caption, folder_caption, join_prefix,
                              read_metadata_jsonl, read_sidecar, resolve_caption)
from captions.tags import process_caption, split_tags, tag_frequencies

__all__ = ["CaptionError", "CaptionResult", "check_caption_lengths", "clean_caption", "folder_caption", "join_prefix",
           "process_caption", "read_metadata_jsonl", "read_sidecar", "resolve_caption", "split_tags",
           "tag_frequencies"]
