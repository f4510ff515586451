"""The bucketing package's own error types (no dependency on finetune; the trainer wraps them)."""

from __future__ import annotations


class DatasetError(ValueError):
    """The dataset cannot be used at all (no usable image, unreadable folder); names the path and the fix."""


class ImageError(ValueError):
    """One image cannot be used as recorded (over the pixel limit, changed since the manifest); names the file."""
