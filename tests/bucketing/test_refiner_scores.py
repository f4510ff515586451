"""The refiner's micro-conditioning and aesthetic scores: pure, torch-free, recorded in the manifest."""

from __future__ import annotations

import json

import pytest

from bucketing.assign import refiner_add_time_ids
from bucketing.manifest import BuildOptions, SubsetSpec, build_manifest
from captions.scores import ScoreError, check_score, read_aesthetic_scores
from conftest import make_image


def test_refiner_add_time_ids_order_matches_the_img2img_pipeline():
    # diffusers: original_size + crops_coords_top_left + (aesthetic_score,); no target size.
    assert refiner_add_time_ids((768, 1024), (12, 34), 7.25) == [768.0, 1024.0, 12.0, 34.0, 7.25]


def write_metadata(folder, entries):
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(e) for e in entries) + "\n", encoding="utf-8")


def test_scores_come_from_metadata_jsonl_and_the_default_fills_the_rest(tmp_path):
    for i in range(3):
        make_image(tmp_path / f"{i}.png", 64, 96, color=(60 * i, 40, 40))
    write_metadata(tmp_path, [{"file_name": "0.png", "text": "a", "aesthetic_score": 7.5},
                              {"file_name": "1.png", "text": "b"}])
    result = build_manifest([SubsetSpec(folder=tmp_path)], BuildOptions(resolution=64, min_side=64,
                                                                         aesthetic_score=5.0), tmp_path / "work")
    scores = dict(zip(result.dataset["path"], result.dataset["aesthetic_score"]))
    assert scores == {"0.png": 7.5, "1.png": 5.0, "2.png": 5.0}


@pytest.mark.parametrize("value, match", [("high", "must be a number"), (11, "outside 0-10"), (-1, "outside 0-10"),
                                          (True, "must be a number"), (float("nan"), "outside 0-10")])
def test_a_bad_score_is_one_line_naming_the_file_and_line(tmp_path, value, match):
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "x"}) + "\n"
        + json.dumps({"file_name": "b.png", "aesthetic_score": value}) + "\n", encoding="utf-8")
    with pytest.raises(ScoreError, match=match) as err:
        read_aesthetic_scores(tmp_path)
    assert f"{tmp_path / 'metadata.jsonl'}:2" in str(err.value) and "\n" not in str(err.value)


def test_scores_at_the_ends_of_the_range_are_kept():
    assert check_score(0, "x") == 0.0 and check_score(10, "x") == 10.0
