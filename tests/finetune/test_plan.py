"""finetune/plan.py: the run's plan counts exactly the sampler's batches, and names the images never trained."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bucketing.sampler import BucketBatchSampler
from conftest import make_image
from finetune.cli import main
from finetune.config import TrainingConfig
from finetune.plan import run_plan, subset_sampling

# Rows: (bucket, repeats, subset); bucket A has 7 rows, B 3, C 1.
A, B, C = (128, 128), (96, 160), (64, 256)
ROWS = [(A, 1, "s0")] * 5 + [(A, 2, "s1")] * 2 + [(B, 1, "s0")] * 2 + [(B, 3, "s1")] + [(C, 1, "s1")]


def manifest(rows=ROWS) -> dict:
    return {"bucket": [list(b) for b, _, _ in rows], "repeats": [r for _, r, _ in rows],
            "subset": [s for _, _, s in rows], "path": [f"{i}.png" for i in range(len(rows))],
            "fingerprint": [f"f{i}" for i in range(len(rows))]}


def dataset_cfg(remainder: str, batch_sizes=(None, None), probabilities=(None, None)):
    subsets = [SimpleNamespace(subset_name=f"s{i}", batch_size=b, probability=p)
               for i, (b, p) in enumerate(zip(batch_sizes, probabilities))]
    return SimpleNamespace(remainder=remainder, subsets=subsets)


def sampler_for(table: dict, data, training, num_replicas: int, rank: int) -> BucketBatchSampler:
    """The sampler exactly as `finetune.train.batches.build_dataloader` builds it."""
    sizes, groups, weights = subset_sampling(table["subset"], data, training.batch_size)
    return BucketBatchSampler([tuple(b) for b in table["bucket"]], batch_size=training.batch_size, seed=training.seed,
                              repeats=table["repeats"], num_replicas=num_replicas, rank=rank,
                              remainder=data.remainder, batch_sizes=sizes, groups=groups, group_weights=weights)


@pytest.mark.parametrize("remainder", ["drop", "carry"])
@pytest.mark.parametrize("num_replicas", [1, 2])
@pytest.mark.parametrize("batch_size, subset_batches, probabilities", [
    (1, (None, None), (None, None)), (2, (None, None), (None, None)), (3, (None, None), (None, None)),
    (2, (None, 1), (None, None)), (2, (None, None), (1.0, 3.0))])
def test_batches_per_epoch_are_the_samplers_on_every_process(remainder, num_replicas, batch_size, subset_batches,
                                                             probabilities):
    data = dataset_cfg(remainder, subset_batches, probabilities)
    training = TrainingConfig(batch_size=batch_size, gradient_accumulation_steps=3, seed=5)
    plan = run_plan(manifest(), data, training, num_processes=num_replicas)
    for rank in range(num_replicas):
        sampler = sampler_for(manifest(), data, training, num_replicas, rank)
        assert plan.batches_per_epoch == len(sampler) == len(list(sampler))
    assert plan.steps_per_epoch == -(-plan.batches_per_epoch // 3)


def test_a_bucket_smaller_than_the_batch_with_remainder_drop_is_named_as_never_trained():
    training = TrainingConfig(batch_size=2, gradient_accumulation_steps=4, max_epochs=2)
    plan = run_plan(manifest(), dataset_cfg("drop"), training)
    [never] = plan.warnings()
    assert "bucket 64x256: its 1 images are never trained" in never and 'dataset.remainder = "carry"' in never
    assert plan.warnings() != [] and run_plan(manifest(), dataset_cfg("carry"), training).warnings() == []
    # A: 9 draws -> 4 batches (1 left out each epoch); B: 5 -> 2 (1 left out); C: 1 -> 0. 6 batches, 2 steps per epoch.
    assert [(g.bucket, g.batches, g.left_out) for g in plan.buckets] == [(C, 0, 1), (B, 2, 1), (A, 4, 1)]
    assert (plan.batches_per_epoch, plan.steps_per_epoch, plan.total_steps) == (6, 2, 4)
    assert training.steps_for_epochs(plan.batches_per_epoch) == plan.total_steps
    assert "2 epochs (training.max_epochs)" in plan.text() and "warning: bucket 64x256" in plan.text()


def test_validation_hold_out_is_named_and_not_planned():
    training = TrainingConfig(batch_size=1, max_steps=10)
    plan = run_plan(manifest(), dataset_cfg("carry"), training, validation_split=0.5)
    assert 0 < plan.held_out < len(ROWS)
    assert sum(g.images for g in plan.buckets) == len(ROWS) - plan.held_out
    assert [w for w in plan.warnings() if "held out for the validation loss (validation.split = 0.5)" in w]


def test_epoch_steps_round_each_epoch_up_not_the_whole_run():
    # 10 batches, accumulation 4: each epoch is 4 + 4 + 2 micro-batches, 3 steps; two epochs are 6, not ceil(20/4) = 5.
    assert TrainingConfig(max_epochs=2, gradient_accumulation_steps=4).steps_for_epochs(10) == 6


def test_dataset_inspect_prints_the_plan_after_the_bucket_table(tmp_path, capsys):
    images = tmp_path / "images"
    for i, (h, w) in enumerate([(128, 128), (128, 128), (128, 128), (64, 256)]):
        make_image(images / f"{i}.png", h, w, color=(200, 40 * i, 40))
    (tmp_path / "model").mkdir()
    config = tmp_path / "c.toml"
    config.write_text(f'[model]\npretrained = "{tmp_path / "model"}"\n[dataset]\nresolution = 128\nmin_side = 64\n'
                      f'remainder = "drop"\n[[dataset.subsets]]\nfolder = "{images}"\n[training]\nbatch_size = 2\n'
                      f'gradient_accumulation_steps = 2\nmax_epochs = 3\n[output]\ndir = "{tmp_path / "out"}"\n',
                      encoding="utf-8")
    assert main(["dataset", "inspect", str(config)]) == 0
    out = capsys.readouterr().out
    table, plan = out.split("plan:")
    assert "bucket (h x w)" in table
    assert "1 batches per epoch, accumulation 2: 1 optimizer steps per epoch" in plan and "3 steps in all" in plan
    assert "warning: bucket 64x256: its 1 images are never trained" in plan
    assert not (tmp_path / "out").exists()
