"""The config form: generated from the schema, TOML round trip keeping comments, the CLI's messages per key."""

from __future__ import annotations


import pytest

pytest.importorskip("tomlkit")

from finetune.config import TrainConfig  # noqa: E402
from finetune.studio import config_form as cf  # noqa: E402
from finetune.studio.paths import Workspace  # noqa: E402

TOML = """# my run
[model]
pretrained = "model"  # the base

[training]
# how long
max_steps = 10
learning_rate = 1e-4

[[dataset.subsets]]
folder = "images"
"""


def test_every_schema_key_has_a_field():
    specs = {s.dotted: s for s in cf.form_fields()}
    for table, field in TrainConfig.model_fields.items():
        model = cf._table_of(field.annotation)
        for key, inner in model.model_fields.items():
            if cf._table_of(inner.annotation) is not None:  # [[dataset.subsets]]: its keys are fields
                continue
            assert any(d.startswith(f"{table}.") and d.endswith(f".{key}") or d == f"{table}.{key}" for d in specs)
    assert specs["training.mixed_precision"].kind == "choice"
    assert specs["training.mixed_precision"].choices == ("no", "bf16", "fp16")
    assert specs["dataset.subsets.0.folder"].kind == "path"
    assert specs["training.learning_rate"].description


def test_round_trip_keeps_comments_and_order(tmp_path):
    doc = cf.parse_document(TOML)
    cf.set_value(doc, ("training", "max_steps"), 20)
    cf.set_value(doc, ("training", "learning_rate"), None)  # back to the default: the key goes
    cf.set_value(doc, ("lora", "rank"), 8)  # a new table is appended
    cf.set_value(doc, ("dataset", "subsets", "0", "repeats"), 2)
    out = cf.save_document(doc, tmp_path / "c.toml").read_text(encoding="utf-8")
    assert out.startswith("# my run\n[model]\npretrained = \"model\"  # the base\n")
    assert "# how long\nmax_steps = 20\n" in out and "learning_rate" not in out
    assert out.index("[training]") < out.index("[[dataset.subsets]]") < out.index("[lora]")
    assert cf.get_value(cf.parse_document(out), ("dataset", "subsets", "0", "repeats")) == 2


def test_messages_land_on_their_keys(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "images").mkdir()
    doc = cf.parse_document(TOML)
    value, _ = cf.field_value(next(s for s in cf.form_fields() if s.dotted == "training.learning_rate"), "-1")
    cf.set_value(doc, ("training", "learning_rate"), value)
    cf.set_value(doc, ("dataset", "subsets", "0", "folder"), "missing")
    cfg, errors, messages = cf.validate(doc, tmp_path / "train.toml")
    assert cfg is None
    assert errors["training.learning_rate"] == "train.toml: training.learning_rate = -1: Input should be greater than 0"
    assert "folder does not exist" in errors["dataset.subsets.0.folder"]
    cf.set_value(doc, ("training", "learning_rate"), None)
    cf.set_value(doc, ("dataset", "subsets", "0", "folder"), "images")
    cf.set_value(doc, ("dataset", "shuffle_tags"), True)  # a cross-field rule names its key first
    _, errors, _ = cf.validate(doc, tmp_path / "train.toml")
    assert "set cache.text = false" in errors["dataset.shuffle_tags"]


def test_paths_outside_the_workspace_are_flagged(tmp_path):
    ws_root = tmp_path / "ws"
    (ws_root / "images").mkdir(parents=True)
    (tmp_path / "model").mkdir()
    doc = cf.parse_document(TOML.replace('"model"', '"../model"'))
    cfg, errors, _ = cf.validate(doc, ws_root / "train.toml", Workspace(ws_root))
    assert cfg is None and "outside the workspace" in errors["model.pretrained"]


def test_field_values_read_like_set_overrides():
    specs = {s.dotted: s for s in cf.form_fields()}
    assert cf.field_value(specs["training.max_steps"], "12") == (12, None)
    assert cf.field_value(specs["training.max_steps"], "") == (None, None)
    assert cf.field_value(specs["training.block_lr_scale"], '{"mid_block" = 0.5}') == ({"mid_block": 0.5}, None)
    assert cf.field_value(specs["output.name"], "42") == ("42", None)  # a text key stays text
    assert cf.shown_value(specs["sample.seeds"], [0, 1]) == "[0, 1]"
