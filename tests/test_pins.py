"""The linters CI runs are pinned, so a new release cannot turn CI red without a change here."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@pytest.mark.parametrize("tool", ["ruff", "mypy"])
def test_the_linter_is_pinned_to_the_version_the_suite_runs(tool: str) -> None:
    dev = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]["dev"]
    pins = [match for item in dev if (match := re.fullmatch(rf"{tool}==([\w.]+)", item))]
    assert len(pins) == 1, f"{tool} is not pinned exactly in the dev extra: {dev}"
    try:
        installed = version(tool)
    except PackageNotFoundError:
        pytest.skip(f"{tool} is not installed here")
    assert installed == pins[0].group(1)
