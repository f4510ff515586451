"""Subsets mixed as users mix them: several pixel budgets in one run, loss weights, shares, batch sizes."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import make_image
from trainer_runs import adapter_tensors, make_shapes_folder, write_config
from finetune.config import load_config
from finetune.train.recipe import train


# The shapes at two budgets (128² and 192²), and a second folder at 128² with its own batch size and
# weight; equal probabilities give each subset half of every epoch's 10 draws (8 shape rows + 2 squares).
MIXED = """
resolution = [128, 192]
loss_weight = 0.5
probability = 1.0
[[dataset.subsets]]
folder = "{squares}"
batch_size = 1
loss_weight = 2.0
probability = 1.0
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    shapes = make_shapes_folder(tmp_path_factory.mktemp("shapes"))
    squares = tmp_path_factory.mktemp("squares")
    for i in range(2):
        make_image(squares / f"s{i}.png", 100, 100, color=(30, 200, 60 * i))
        (squares / f"s{i}.txt").write_text(f"a green square {i}", encoding="utf-8")
    return shapes, squares


def mixed_config(folder: Path, model: Path, folders, steps: int = 6, every: int = 3) -> Path:
    shapes, squares = folders
    path = write_config(folder, model, shapes, steps=steps, every=every)
    text = path.read_text(encoding="utf-8").replace(f'folder = "{shapes}"\n',
                                                    f'folder = "{shapes}"\n' + MIXED.format(squares=squares))
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.slow
def test_two_budgets_plan_cache_train_and_resume_bitwise(tmp_path, tiny_model_dir, folders):
    from bucketing.manifest import load_manifest
    from finetune.cache.latents import latent_keys_for_manifest
    from finetune.models.load import load_models

    whole = tmp_path / "whole"
    whole.mkdir()
    cfg = load_config(mixed_config(whole, tiny_model_dir, folders))
    seen: list[tuple] = []

    def recording(unet, scheduler, latents, embeds, pooled, time_ids, weights, *args, **kwargs):
        from finetune.train.step import diffusion_step_loss

        seen.append((tuple(latents.shape), time_ids.tolist(), weights.tolist()))
        return diffusion_step_loss(unet, scheduler, latents, embeds, pooled, time_ids, weights, *args, **kwargs)

    full = train(cfg, progress=False, step_loss=recording)

    # Plan: each shape image is a row at both budgets, with its own bucket; the squares at 128² only.
    manifest = load_manifest(cfg.output.manifest_dir)
    rows = list(manifest)
    shapes = [r for r in rows if r["subset"] == folders[0].name]
    assert Counter(r["resolution"] for r in shapes) == {128: 4, 192: 4}
    for path in {r["path"] for r in shapes}:
        at = {r["resolution"]: r["bucket"] for r in shapes if r["path"] == path}
        assert at[192][0] * at[192][1] > at[128][0] * at[128][1]
    # Caches: the latent key includes bucket and crop, so the two budgets of one image never share an entry.
    vae = load_models(cfg.model, dtype=torch.float32).vae
    keys = latent_keys_for_manifest(manifest, vae, dtype=cfg.cache.dtype, store_std=cfg.cache.latent_std)
    assert len(set(keys)) == len(rows) == 10
    # Batches: one shape each; micro-conditioning's target is the row's own bucket; weights per subset.
    for shape, time_ids, weights in seen:
        h, w = shape[2] * 8, shape[3] * 8
        assert all(t[4:] == [h, w] for t in time_ids)
        assert len(set(weights)) == 1 and weights[0] in (0.5, 2.0)
        assert len(weights) == 1 if weights[0] == 2.0 else len(weights) in (1, 2)  # squares: batch_size 1
    assert {w[0] for _, _, w in seen} == {0.5, 2.0}

    # Killed after 3 steps and resumed: bitwise the same as the uninterrupted run.
    parts = tmp_path / "parts"
    parts.mkdir()
    path = mixed_config(parts, tiny_model_dir, folders)
    assert train(load_config(path, ["training.max_steps=3"]), progress=False).step == 3
    resumed = train(load_config(path), resume="latest", progress=False)
    a, b = adapter_tensors(full.output_path), adapter_tensors(resumed.output_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full.losses[3:] == resumed.losses


@pytest.mark.slow
def test_plan_prints_buckets_per_budget_and_each_subset(tmp_path, tiny_model_dir, folders, capsys):
    cfg = load_config(mixed_config(tmp_path, tiny_model_dir, folders, steps=1, every=5))
    train(cfg, progress=False)
    out = capsys.readouterr().out
    assert "resolution 128 (~128x128 pixels):" in out and "resolution 192 (~192x192 pixels):" in out
    assert f"subset {folders[0].name}: resolution 128/192, effective batch 2, 5 images per epoch" in out
    assert f"subset {folders[1].name}: resolution 128, effective batch 1, 5 images per epoch" in out


def test_loss_weight_scales_each_subsets_loss_and_prior_loss_weight_still_works():
    from finetune.train.batches import TrainDataset
    from finetune.train.loss import diffusion_loss

    class Cfg:  # the dataset keys TrainDataset reads
        crop, shuffle_tags, keep_tokens, tag_dropout, caption_dropout = "center", False, 0, 0.0, 0.0

    row = {"original_size": [64, 64], "crop_top_left": [0, 0], "bucket": [64, 64], "flip": False, "caption": "c"}
    rows = [{**row, "loss_weight": 2.0, "is_regularization": False},
            {**row, "loss_weight": None, "is_regularization": False},
            {**row, "loss_weight": None, "is_regularization": True},  # the old key: loss.prior_loss_weight
            {**row, "loss_weight": 0.5, "is_regularization": True}]  # the subset's own key wins
    data = TrainDataset(rows, Cfg(), seed=0, prior_loss_weight=0.25, latents=lambda i: {"mean": None},
                        text=lambda c: (None, None))
    weights = torch.stack([data[i]["loss_weight"] for i in range(4)])
    assert weights.tolist() == [2.0, 1.0, 0.25, 0.5]
    pred, target = torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2) * torch.tensor([1.0, 2, 3, 4]).view(4, 1, 1, 1)
    per_image = torch.tensor([1.0, 4, 9, 16])  # squared errors
    assert float(diffusion_loss(pred, target, weights=weights)) == pytest.approx(float((per_image * weights).mean()))
