"""Per-image aesthetic scores for the SDXL refiner: the `aesthetic_score` field of metadata.jsonl.

The refiner is conditioned on an aesthetic score (0-10, LAION's aesthetic predictor scale; SDXL's
refiner pipeline defaults to 6.0). One documented source: the same `metadata.jsonl` that may hold the
captions, one JSON object per line with `file_name` and, optionally, `aesthetic_score`. Images
without one get the dataset's default (`dataset.aesthetic_score`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from captions.sources import CaptionError, metadata_key

SCORE_FIELD = "aesthetic_score"
SCORE_RANGE = (0.0, 10.0)


class ScoreError(CaptionError):
    """An aesthetic score that is not a number in 0-10; names the file and line."""


def check_score(value, where: str) -> float:
    """`value` as a float in [0, 10], or ScoreError naming `where`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScoreError(f"{where}: {SCORE_FIELD} must be a number from 0 to 10, got {value!r}")
    low, high = SCORE_RANGE
    if not math.isfinite(value) or not low <= value <= high:
        raise ScoreError(f"{where}: {SCORE_FIELD} = {value!r} is outside 0-10 (LAION's aesthetic scale)")
    return float(value)


def read_aesthetic_scores(folder: Path) -> dict[str, float]:
    """{posix path relative to folder: score} from `folder/metadata.jsonl`; {} without the file.

    Lines without the field are skipped (their images take the default); the caption reader
    already reports lines that are not JSON objects.

    Raises:
        ScoreError: a score that is not a number or is outside 0-10 (message: file:line).
    """
    path = Path(folder) / "metadata.jsonl"
    if not path.is_file():
        return {}
    scores = {}
    for number, line in enumerate(path.read_text(encoding="utf-8-sig", errors="replace").splitlines(), start=1):
        try:
            entry = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            continue  # read_metadata_jsonl names the line
        if not isinstance(entry, dict) or SCORE_FIELD not in entry or not isinstance(entry.get("file_name"), str):
            continue
        scores[metadata_key(entry["file_name"])] = check_score(entry[SCORE_FIELD], f"{path}:{number}")
    return scores
