"""Training samples from manifest rows: cached latents/embeddings (or images/captions) + micro-conditioning."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bucketing.assign import add_time_ids, assign, refiner_add_time_ids
from bucketing.buckets import Bucket
from bucketing.image import load_bucket_image
from bucketing.sampler import BucketBatchSampler
from captions.tags import process_caption
from finetune.plan import subset_sampling

LatentLookup = Callable[[int], dict]  # row index -> {"mean": (4, h, w), "std": (4, h, w) or absent}
TextLookup = Callable[[str], tuple]  # caption -> (prompt_embeds (77k, C), pooled (P,))


class TrainDataset(Dataset):
    """One sample per manifest row; what it holds depends on which caches exist.

    With a latent cache a sample carries `latents_mean`/`latents_std`, else `pixels` in [-1, 1].
    With a text cache it carries `prompt_embeds`/`pooled_prompt_embeds`, else the `caption` text
    after the per-step tag changes. `add_time_ids` always come from the manifest row, never recomputed
    from the image.
    """

    def __init__(self, manifest, dataset_cfg, *, seed: int, prior_loss_weight: float = 1.0,
                 latents: LatentLookup | None = None, text: TextLookup | None = None, masked: bool = False,
                 kind: str = "base"):
        self.rows = manifest
        self.kind = kind  # "refiner": five-value add_time_ids with the row's aesthetic score
        self.cfg = dataset_cfg
        self.seed = seed
        self.prior_loss_weight = prior_loss_weight
        self.latents = latents
        self.text = text
        self.masked = masked
        # Some captions may be encoded live (new words): every sample carries its text, so a batch
        # that mixes both kinds is encoded live as a whole (see `collate`).
        self.text_live = getattr(text, "words", None) is not None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def caption_for(self, index: int, caption: str) -> str:
        # One rng per (seed, epoch, row): the same sample gets the same caption on resume.
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        return process_caption(
            caption, rng,
            shuffle_tags=self.cfg.shuffle_tags, keep_tokens=self.cfg.keep_tokens,
            tag_dropout=self.cfg.tag_dropout, caption_dropout=self.cfg.caption_dropout,
        )

    def crop_for(self, index: int, row: dict) -> tuple[int, int]:
        """The row's crop; with `crop = "random"` (no latent cache) a new one each epoch, reproducibly."""
        if self.cfg.crop != "random" or self.latents is not None:
            return tuple(row["crop_top_left"])
        bucket = Bucket(*row["bucket"])
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}:crop")
        return assign(tuple(row["original_size"]), [bucket], "random", row["flip"], rng).crop_top_left

    def loss_weight_of(self, row: dict) -> float:
        """The subset's loss_weight; unset: loss.prior_loss_weight for regularization images, else 1."""
        if row.get("loss_weight") is not None:
            return float(row["loss_weight"])
        return self.prior_loss_weight if row["is_regularization"] else 1.0

    def __getitem__(self, index: int) -> dict:
        row = self.rows[index]
        crop = self.crop_for(index, row)
        sample = {
            "index": index,
            "add_time_ids": torch.tensor(self.time_ids(row, crop), dtype=torch.float32),
            "loss_weight": torch.tensor(self.loss_weight_of(row)),
        }
        if self.latents is not None:
            cached = self.latents(index)
            sample["latents_mean"] = cached["mean"]
            if cached.get("std") is not None:
                sample["latents_std"] = cached["std"]
        else:
            image = load_bucket_image(Path(row["root"]) / row["path"], tuple(row["bucket"]), crop, row["flip"],
                                      tuple(self.cfg.alpha_color))
            sample["pixels"] = to_pixels(image)
        if self.masked:
            sample["mask"] = load_mask(row, crop)
        caption = self.caption_for(index, row["caption"])
        cached = self.text(caption) if self.text is not None else None  # None: not cached (a new word in it)
        if cached is not None:
            sample["prompt_embeds"], sample["pooled_prompt_embeds"] = cached
        if cached is None or self.text_live:
            sample["caption"] = caption
        return sample

    def time_ids(self, row: dict, crop: tuple[int, int]) -> list:
        """The row's micro-conditioning; manifests older than the `aesthetic_score` column take the default."""
        if self.kind == "refiner":
            score = row.get("aesthetic_score")
            return refiner_add_time_ids(row["original_size"], crop, self.cfg.aesthetic_score if score is None else score)
        return add_time_ids(tuple(row["original_size"]), crop, tuple(row["bucket"]))


def to_pixels(image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) float tensor in [-1, 1], the VAE's input range."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_mask(row: dict, crop: tuple[int, int] | None = None) -> torch.Tensor:
    """(1, H, W) loss weights in [0, 1], cropped and flipped like the image; all ones when it has no mask."""
    height, width = row["bucket"]
    if not row.get("mask_path"):
        return torch.ones(1, height, width)
    crop = crop if crop is not None else tuple(row["crop_top_left"])
    mask = load_bucket_image(Path(row["mask_path"]), (height, width), crop, row["flip"])
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None]


def collate(samples: list[dict]) -> dict:
    """Stack each key every sample has; a key only some have (cached text beside live text) is left out."""
    batch: dict = {}
    for key in [k for k in samples[0] if all(k in s for s in samples)]:
        values = [s[key] for s in samples]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return batch


def build_dataloader(dataset: TrainDataset, manifest, dataset_cfg, *, batch_size: int, seed: int,
                     num_replicas: int, rank: int) -> tuple[DataLoader, BucketBatchSampler]:
    """A loader whose every batch comes from one bucket; each process gets its own disjoint batches.

    The loader is not passed through `accelerator.prepare`: the sampler already shards by rank, and
    its position (epoch, batch) is saved in our checkpoints.
    """
    batch_sizes, groups, weights = subset_sampling(list(manifest["subset"]), dataset_cfg, batch_size)
    sampler = BucketBatchSampler(
        [tuple(b) for b in manifest["bucket"]], batch_size=batch_size, seed=seed,
        repeats=list(manifest["repeats"]), num_replicas=num_replicas, rank=rank,
        remainder=dataset_cfg.remainder, batch_sizes=batch_sizes, groups=groups, group_weights=weights,
    )
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                        num_workers=dataset_cfg.num_workers, pin_memory=torch.cuda.is_available())
    return loader, sampler

