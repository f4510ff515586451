"""Config loading: one clear line per problem, naming the key; overrides; relative paths; shipped TOMLs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config import dump_config, load_config
from finetune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = """
[model]
pretrained = "model"
[dataset]
resolution = 256
[[dataset.subsets]]
folder = "images"
"""


@pytest.fixture
def project(tmp_path) -> Path:
    (tmp_path / "model").mkdir()
    (tmp_path / "images").mkdir()
    return tmp_path


def write(folder: Path, text: str) -> Path:
    path = folder / "c.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_minimal_config_resolves_paths_against_its_folder(project, monkeypatch):
    monkeypatch.chdir("/")
    cfg = load_config(write(project, MINIMAL))
    assert cfg.model.pretrained == (project / "model").resolve()
    assert cfg.dataset.subsets[0].folder == (project / "images").resolve()
    assert cfg.output.dir == (project / "output").resolve()
    assert cfg.output.adapter_path == cfg.output.dir / "lora.safetensors"


def test_unknown_key_suggests_the_closest(project):
    message = error_of(write(project, MINIMAL + "[training]\nlearning_rat = 1e-4\n"))
    assert "training.learning_rat: unknown key (did you mean learning_rate?)" in message


def test_bad_type_and_bad_value_name_the_key(project):
    message = error_of(write(project, MINIMAL + '[training]\nbatch_size = "two"\nlearning_rate = -1\n'))
    assert "training.batch_size = 'two'" in message
    assert "training.learning_rate = -1" in message and "greater than 0" in message
    assert len(message.splitlines()) == 2  # every problem reported at once


def test_missing_model_path_is_named(tmp_path):
    (tmp_path / "images").mkdir()
    message = error_of(write(tmp_path, MINIMAL))
    assert "model" in message and str(tmp_path / "model") in message and "does not exist" in message


def test_missing_image_folder_is_named(tmp_path):
    (tmp_path / "model").mkdir()
    message = error_of(write(tmp_path, MINIMAL))
    assert "dataset.subsets.0" in message and str(tmp_path / "images") in message


def test_set_overrides_pass_the_same_validation(project):
    path = write(project, MINIMAL)
    cfg = load_config(path, ["training.max_steps=10", "output.name=my_lora", "lora.rank=4"])
    assert (cfg.training.max_steps, cfg.output.name, cfg.lora.rank) == (10, "my_lora", 4)
    assert "training.learning_rate = -1" in error_of(path, ["training.learning_rate=-1"])
    assert "unknown key" in error_of(path, ["training.max_step=10"])


def test_caption_changes_exclude_the_text_cache(project):
    message = error_of(write(project, MINIMAL.replace("resolution = 256", "resolution = 256\nshuffle_tags = true")))
    assert "shuffle_tags" in message and "cache.text = false" in message
    cfg = load_config(write(project, MINIMAL), ["dataset.shuffle_tags=true", "cache.text=false"])
    assert cfg.dataset.shuffle_tags


def test_lora_settings_a_full_run_ignores_are_named_in_a_warning(project, caplog):
    path = write(project, MINIMAL + "[lora]\nrank = 32\nalpha = 16\n")  # alpha: set, but at its default
    load_config(path, ["training.method=full"])
    assert [r.getMessage() for r in caplog.records] == [
        "warning: c.toml: lora.rank = 32: training.method = 'full' trains no LoRA, so [lora] is ignored; "
        'remove the [lora] table or set method = "lora"']
    caplog.clear()
    load_config(path)  # a LoRA run uses them
    resolved = write(project, dump_config(load_config(write(project, MINIMAL), ["training.method=full"])))
    load_config(resolved)  # a full run's resolved config writes every [lora] key at its default
    assert caplog.records == []


def test_random_crop_excludes_the_latent_cache(project):
    assert "cache.latents = false" in error_of(write(project, MINIMAL), ["dataset.crop=random"])


@pytest.mark.parametrize("overrides, words", [
    (["memory.fused_backward=true"], "training.method = 'full'"),
    (["training.method=full", "memory.fused_backward=true", "training.gradient_accumulation_steps=2"],
     "gradient_accumulation_steps = 1"),
    (["training.method=full", "memory.fused_backward=true", "training.mixed_precision=fp16"], "'bf16'"),
    (["training.method=full", "memory.fused_backward=true", "optimizer.name=prodigy"], "adamw8bit"),
    (["training.method=full", "memory.weight_dtype=bf16"], "memory.fused_backward = true"),
    (["training.method=full", "memory.fused_backward=true", "memory.weight_dtype=bf16", "training.ema_decay=0.99"],
     "unset training.ema_decay"),
    (["training.method=full", "memory.fused_backward=true", "memory.weight_dtype=bf16",
      "training.mixed_precision=no"], "training.mixed_precision = 'bf16'"),
])
def test_fused_backward_and_bf16_weights_refuse_what_they_cannot_do(project, overrides, words):
    assert words in error_of(write(project, MINIMAL), overrides)


def test_fused_backward_with_bf16_weights_is_accepted_for_full_fine_tuning(project):
    cfg = load_config(write(project, MINIMAL), ["training.method=full", "memory.fused_backward=true",
                                                "memory.weight_dtype=bf16", "optimizer.name=adamw8bit"])
    assert cfg.memory.fused_backward and cfg.memory.weight_dtype == "bf16"


def test_lora_plus_needs_a_variant_with_up_matrices(project):
    assert "lora: plus_ratio: LoRA+" in error_of(write(project, MINIMAL), ["lora.plus_ratio=16", 'lora.variant="loha"'])
    assert load_config(write(project, MINIMAL), ["lora.plus_ratio=16", 'lora.variant="dora"']).lora.plus_ratio == 16
    assert "lora: max_norm: bounds LoRA's up @ down" in error_of(write(project, MINIMAL),
                                                                 ["lora.max_norm=1", 'lora.variant="lokr"'])


def test_an_empty_timestep_range_names_both_keys(project):
    message = error_of(write(project, MINIMAL), ["loss.min_timestep=600", "loss.max_timestep=400"])
    assert "loss: min_timestep: 600 must be below max_timestep 400" in message


def test_resolved_config_round_trips(project):
    cfg = load_config(write(project, MINIMAL))
    again = write(project, dump_config(cfg))
    assert load_config(again) == cfg


def test_every_shipped_toml_is_valid(tmp_path):
    """train_config.toml (and any other TOML we ship) parses against the config the trainer consumes."""
    shipped = [ROOT / "train_config.toml", *sorted((ROOT / "configs").glob("*.toml"))]
    assert shipped[0].is_file(), "the template train_config.toml must ship with the project"
    for source in shipped:
        work = tmp_path / source.stem
        work.mkdir()
        shutil.copy(source, work / source.name)
        cfg_text = source.read_text(encoding="utf-8")
        import tomllib

        raw = tomllib.loads(cfg_text)
        (work / raw["model"]["pretrained"]).mkdir(parents=True)
        for subset in raw["dataset"]["subsets"]:
            (work / subset["folder"]).mkdir(parents=True, exist_ok=True)
        cfg = load_config(work / source.name)
        # What the file says is what the trainer gets: every key it sets arrives with its value.
        for table, keys in raw.items():
            if isinstance(keys, dict):
                for key, value in keys.items():
                    if not isinstance(value, (dict, list)) and key not in ("pretrained", "dir", "folder"):
                        assert getattr(getattr(cfg, table), key) == value, f"{source.name}: {table}.{key}"


def test_quickstart_toml_is_valid(tmp_path):
    from finetune.tools.quickstart import quickstart_config

    (tmp_path / "tiny-sdxl").mkdir()
    (tmp_path / "images").mkdir()
    path = tmp_path / "train_config.toml"
    path.write_text(quickstart_config(5), encoding="utf-8")
    assert load_config(path).training.max_steps == 5


@pytest.mark.slow
def test_cli_config_error_is_one_line_without_traceback(project):
    path = write(project, MINIMAL + "[training]\nlearning_rate = -1\n")
    proc = subprocess.run([sys.executable, "-m", "finetune", "dataset", "build", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "training.learning_rate = -1" in proc.stderr
    assert "Traceback" not in proc.stderr


def config_keys() -> set[str]:
    """Every dotted key of the config, `[[dataset.subsets]]` keys as `dataset.subsets.<key>` (and
    `[[embeddings]]` keys as `embeddings.<key>`)."""
    from pydantic import BaseModel

    from finetune.config import EmbeddingConfig, SubsetConfig, TrainConfig

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from walk(kind, f"{prefix}{name}.")
            else:
                yield prefix + name

    return (set(walk(TrainConfig, "")) | set(walk(SubsetConfig, "dataset.subsets."))
            | set(walk(EmbeddingConfig, "embeddings.")))


def test_the_kohya_guide_names_only_real_keys_and_commands():
    import re

    from finetune.cli import build_parser

    text = (ROOT / "docs" / "from-kohya.md").read_text(encoding="utf-8")
    ours = [row.split("|")[2] for row in text.splitlines() if row.startswith("| ") and row.count("|") >= 3]
    named = [m.split(" =")[0] for cell in ours for m in re.findall(r"`([^`]+)`", cell)]
    keys = [n for n in named if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", n)]
    commands = [n.split()[1] for n in named if n.startswith("finetune ")]
    assert len(keys) > 60 and len(commands) >= 5  # the table was read
    assert [k for k in keys if k not in config_keys()] == []
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert [c for c in commands if c not in subcommands] == []


def test_set_reaches_a_subset_by_index_and_a_key_without_its_table_gets_a_hint(project):
    path = project / "c.toml"
    path.write_text('[model]\npretrained = "model"\n[dataset]\n[[dataset.subsets]]\nfolder = "images"\n', encoding="utf-8")
    (project / "j").mkdir()
    cfg = load_config(path, [f"dataset.subsets.0.folder={project / 'j'}", "dataset.subsets.0.repeats=3"])
    assert cfg.dataset.subsets[0].folder == project / "j" and cfg.dataset.subsets[0].repeats == 3
    with pytest.raises(ConfigError, match=r"dataset.subsets has 1 table\(s\); use an index from 0 to 0"):
        load_config(path, ["dataset.subsets.1.repeats=2"])
    with pytest.raises(ConfigError, match=r"max_steps: unknown key \(did you mean training.max_steps\?\)"):
        load_config(path, ["max_steps=5"])


def test_a_config_without_its_model_table_names_the_key_to_add(project):
    path = project / "c.toml"
    path.write_text('[dataset]\n[[dataset.subsets]]\nfolder = "images"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "c.toml: model.pretrained: required (SDXL as a local diffusers folder" in str(info.value)


def test_an_old_training_key_names_its_new_table(project):
    path = project / "c.toml"
    path.write_text('[model]\npretrained = "model"\n[dataset]\n[[dataset.subsets]]\nfolder = "images"\n'
                    '[training]\nbase_dtype = "bf16"\nmemory_profile = "low_vram"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "training.base_dtype: moved to memory.base_dtype (the [memory] table)" in str(info.value)
    assert "training.memory_profile: moved to memory.profile" in str(info.value)


def test_a_warmup_as_long_as_the_run_is_refused_by_the_schema(project):
    path = project / "c.toml"
    path.write_text('[model]\npretrained = "model"\n[dataset]\n[[dataset.subsets]]\nfolder = "images"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="optimizer.warmup_steps = 50 must be below training.max_steps = 50"):
        load_config(path, ["training.max_steps=50", "optimizer.warmup_steps=50"])


def test_bucket_sides_follow_the_resolution_unless_set(project):
    # Old code: min_side = 512 whatever the budget (512: bucketing off; 256: no bucket fits).
    for resolution, sides in ((256, (128, 512)), (512, (256, 1024)), (1024, (512, 2048))):
        cfg = load_config(write(project, MINIMAL), [f"dataset.resolution={resolution}"])
        assert (cfg.dataset.min_side, cfg.dataset.max_side) == sides
    cfg = load_config(write(project, MINIMAL), ["dataset.min_side=192"])
    assert (cfg.dataset.min_side, cfg.dataset.max_side) == (192, 512)
    dumped = dump_config(load_config(write(project, MINIMAL)))
    assert "min_side = 128" in dumped and "max_side = 512" in dumped  # the resolved config records them


def test_subset_mixing_keys_are_checked(project):
    (project / "other").mkdir()
    two = MINIMAL + '[[dataset.subsets]]\nfolder = "other"\n'
    assert "missing on 'other'" in error_of(write(project, two.replace('"images"\n', '"images"\nprobability = 2\n')))
    cfg = load_config(write(project, two.replace('"other"\n', '"other"\nresolution = [256, 512]\nbatch_size = 4\n')))
    assert cfg.dataset.subsets[1].resolutions == [256, 512] and cfg.dataset.subsets[1].batch_size == 4
    assert "multiple of bucket_step" in error_of(write(project, two.replace('"other"\n', '"other"\nresolution = 300\n')))
    same = MINIMAL + '[[dataset.subsets]]\nfolder = "images"\nbatch_size = 2\n'
    assert "distinct `name" in error_of(write(project, same))
