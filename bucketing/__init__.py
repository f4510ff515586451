"""Bucketed dataset planning: aspect-ratio buckets, per-image crops and sizes, the manifest and its sampler.

Plain Python + Pillow (+ `datasets` for the manifest): usable by any trainer.
"""

from bucketing.assign import Assignment, add_time_ids, assign, resized_size
from bucketing.buckets import Bucket, format_bucket_table, make_buckets, nearest_bucket
from bucketing.errors import DatasetError, ImageError

__all__ = ["Assignment", "Bucket", "DatasetError", "ImageError", "add_time_ids", "assign", "format_bucket_table",
           "make_buckets", "nearest_bucket", "resized_size"]
