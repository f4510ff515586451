"""Fixtures of the trainer tests: a folder of captioned shapes in three aspect ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer_runs import make_shapes_folder


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory) -> Path:
    return make_shapes_folder(tmp_path_factory.mktemp("shapes"))
