"""The dataset page's logic: scan a config's (or a folder's) images into rows, filter and page them, save captions.

The scan is `bucketing.manifest.build_manifest` with the run's own validation cache
(`<output.dir>/dataset-work/validation.json`, as `finetune dataset build` and `finetune train` use it),
so images validated before are not decoded again. Nothing here writes into the image folders except
`save_caption`, on an explicit save.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bucketing.manifest import build_manifest
from captions.sources import read_sidecar
from finetune.config import DatasetConfig, load_config
from finetune.dataset import build_options, subset_specs
from finetune.errors import DatasetError
from finetune.io import atomic_file
from finetune.studio.paths import PathRefused, Workspace
from finetune.studio.thumbs import cropped_percent, thumbnail

PAGE_SIZE = 24
ALL = "all"
ANY_NOTE = "any note"
# A report line's kind, by the words bucketing and captions use in it (first match wins).
PROBLEM_KINDS = (("duplicate", "duplicate"), ("too small", "tiny"), ("not UTF-8", "non-UTF-8 caption"),
                 ("cannot read", "corrupt"), ("truncated", "corrupt"), ("cannot identify", "corrupt"),
                 ("unsupported", "unsupported format"), ("over the limit", "too large"),
                 ("no caption", "no caption"), ("empty", "empty caption"), ("EXIF", "EXIF rotated"),
                 ("converted", "converted to RGB"), ("mask", "mask"))


def problem_kind(reason: str) -> str:
    return next((kind for word, kind in PROBLEM_KINDS if word.lower() in reason.lower()), "other")


@dataclass
class DatasetView:
    """One scanned dataset: rows (one per image, flipped twins left out), the plan and the report."""

    source: Path  # the config file or folder that was opened
    rows: list[dict]
    buckets: tuple  # bucketing.buckets.Bucket, the whole plan
    problems: list[tuple[str, str, str]]  # (path, kind, reason): skipped images and notes on kept ones
    thumbs_dir: Path
    caption_ext: dict[str, str] = field(default_factory=dict)  # subset name -> sidecar extension
    editable: dict[str, bool] = field(default_factory=dict)  # subset name -> captions are sidecar files

    def counts(self) -> Counter:
        return Counter(tuple(r["bucket"]) for r in self.rows)

    def bucket_table(self) -> list[list]:
        """[bucket "HxW", aspect, images] for every bucket of the plan, portrait first."""
        counts = self.counts()
        return [[f"{b.height}x{b.width}", round(b.aspect, 2), counts.get(b.size, 0)] for b in self.buckets]

    def kinds(self) -> list[str]:
        return sorted({kind for _, kind, _ in self.problems})


def open_dataset(workspace: Workspace, text: str) -> DatasetView:
    """Scan the dataset of a TOML config, or a bare folder of images (planned with the SDXL defaults).

    Raises:
        PathRefused: the config, a subset folder or the output folder lies outside the workspace.
        ConfigError / DatasetError: as `finetune dataset inspect` would raise them.
    """
    source = workspace.existing(text, "dataset")
    if source.is_dir():
        # A folder alone: SDXL's defaults; the validation cache and thumbnails go to the studio's folder.
        cfg = DatasetConfig(subsets=[{"folder": source}])
        tag = hashlib.sha256(str(source).encode()).hexdigest()[:12]
        work = workspace.studio_dir / "folders" / f"{source.name}-{tag}"
        return _scan(source, cfg, seed=42, work_dir=work / "dataset-work", thumbs_dir=work / "thumbs", workspace=workspace)
    cfg = load_config(source)
    workspace.resolve(cfg.output.dir, "output.dir")
    return _scan(source, cfg.dataset, cfg.training.seed, work_dir=cfg.output.dir / "dataset-work",
                 thumbs_dir=cfg.cache_dir / "studio-thumbs", workspace=workspace)


def _scan(source: Path, cfg, seed: int, work_dir: Path, thumbs_dir: Path, workspace: Workspace) -> DatasetView:
    for subset in cfg.subsets:
        workspace.resolve(subset.folder or subset.hf_dataset, "dataset.subsets.folder")
    workspace.resolve(thumbs_dir, "thumbnail cache")
    try:
        result = build_manifest(subset_specs(cfg), build_options(cfg, seed), work_dir=work_dir)
    except ValueError as err:  # bucketing's errors name the path
        raise DatasetError(str(err)) from None
    notes: dict[str, list[str]] = {}
    for path, note in result.report.notes:
        notes.setdefault(path, []).append(note)
    rows = []
    for row in result.dataset.to_list():
        if row["flip"]:
            continue  # the mirrored twin has the same image and caption
        full = str(Path(row["root"]) / row["path"])
        row.update(abs_path=full, notes=notes.get(full, []),
                   cropped=cropped_percent(row["original_size"], row["bucket"], row["crop_top_left"], row["flip"]))
        rows.append(row)
    problems = [(p, problem_kind(r), r) for p, r in result.report.problems]
    problems += [(p, problem_kind(n), n) for p, n in result.report.notes]
    names = [s.name or Path(s.folder or s.hf_dataset).name for s in cfg.subsets]
    return DatasetView(source, rows, result.buckets, problems, thumbs_dir,
                       caption_ext={n: s.caption_ext for n, s in zip(names, cfg.subsets)},
                       editable={n: s.folder is not None for n, s in zip(names, cfg.subsets)})


def filter_rows(view: DatasetView, bucket: str = ALL, min_cropped: float = 0.0, kind: str = ALL) -> list[int]:
    """Indices of the rows that pass: bucket "HxW" (or all), cropped more than `min_cropped` %, and
    a note of `kind` (ANY_NOTE: any note; all: no filter)."""
    picked = []
    for i, row in enumerate(view.rows):
        if bucket != ALL and f"{row['bucket'][0]}x{row['bucket'][1]}" != bucket:
            continue
        if min_cropped > 0 and row["cropped"] <= min_cropped:
            continue
        if kind == ANY_NOTE and not row["notes"]:
            continue
        if kind not in (ALL, ANY_NOTE) and kind not in {problem_kind(n) for n in row["notes"]}:
            continue
        picked.append(i)
    return picked


def page_count(total: int, size: int = PAGE_SIZE) -> int:
    return max(1, -(-total // size))


def page_items(view: DatasetView, indices: list[int], page: int, size: int = PAGE_SIZE) -> list[tuple[str, str]]:
    """(thumbnail path, label) for page `page` (1-based) of `indices`; thumbnails are made as needed."""
    start = (max(1, page) - 1) * size
    shown = indices[start:start + size]
    # Pillow decodes without the GIL: a few threads make a page of new thumbnails about twice as fast.
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda i: thumbnail(Path(view.rows[i]["abs_path"]), view.rows[i], view.thumbs_dir),
                              shown))
    return [(str(path), label(view.rows[i])) for path, i in zip(paths, shown)]


def label(row: dict) -> str:
    (oh, ow), (bh, bw), (ct, cl) = row["original_size"], row["bucket"], row["crop_top_left"]
    caption = row["caption"] if len(row["caption"]) <= 80 else row["caption"][:77] + "..."
    return (f"{row['path']} | bucket {bh}x{bw} | original {oh}x{ow} | crop_top_left ({ct}, {cl}) | "
            f"cut {row['cropped']:.0f} % | {caption}")


def sidecar_path(view: DatasetView, row: dict) -> Path:
    return Path(row["abs_path"]).with_suffix(view.caption_ext.get(row["subset"], ".txt"))


def caption_for_editing(view: DatasetView, row: dict) -> tuple[str, str]:
    """(text to edit, where it comes from): the sidecar file as written, else the manifest caption."""
    path = sidecar_path(view, row)
    if not view.editable.get(row["subset"], False):
        return row["caption"], "from a `datasets` dataset: edit its caption column instead (read-only here)"
    text, note = read_sidecar(Path(row["abs_path"]), path.suffix)
    if text is None:
        return row["caption"], f"no {path.name} yet: saving creates it (it then wins over metadata.jsonl and prompts)"
    return text, f"{path.name}" + (f" ({note})" if note else "")


def save_caption(workspace: Workspace, view: DatasetView, index: int, text: str) -> Path:
    """Write `text` to the row's sidecar caption file, atomically, as UTF-8; the row shows it at once.

    An existing file keeps its permissions. No other file in the folder changes: the temp file is
    renamed onto the sidecar.

    Raises:
        PathRefused: the sidecar lies outside the workspace, or the subset is not a folder.
    """
    row = view.rows[index]
    if not view.editable.get(row["subset"], False):
        raise PathRefused(f"{row['path']}: comes from a `datasets` dataset; its captions are not sidecar files")
    path = workspace.resolve(sidecar_path(view, row), "caption file")
    text = " ".join(text.split())  # one line, as captions.sources reads it back
    mode = path.stat().st_mode & 0o7777 if path.exists() else None
    with atomic_file(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    if mode is not None:
        # atomic_file gives new files the umask's mode; an edited caption keeps the one it had.
        os.chmod(path, mode)
    row["caption"] = text
    return path
