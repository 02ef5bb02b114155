"""The README's first steps work as written for someone who copies them into a shell."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = "python3 -m venv venv && venv/bin/pip install ."


def running_it_block() -> list[str]:
    """The lines of the first shell block under "## Running it"."""
    section = ROOT.joinpath("README.md").read_text().split("## Running it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)
    assert block is not None, "no shell block under 'Running it'"
    return block.group(1).splitlines()


def test_the_commands_after_the_install_line_find_uproxy(tmp_path: Path) -> None:
    """After ``pip install .`` into ``venv``, the next lines of the block run ``uproxy``
    from a shell whose PATH knows nothing of the venv (each call replaced by --version,
    so nothing is served)."""
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "uproxy").exists() or not (venv / "bin" / "activate").exists():
        pytest.skip("the tests do not run from a virtualenv with uproxy installed")
    lines = running_it_block()
    assert lines[0].split("#")[0].strip() == INSTALL
    # The install is already done: the venv the tests run from stands in for it.
    (tmp_path / "venv").symlink_to(venv)
    script = ["set -e"]
    for line in lines[1:]:
        words = line.split("#")[0].split()
        if words and words[0].endswith("uproxy"):
            line = f"{words[0]} --version"
        script.append(line)
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=tmp_path,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": os.environ.get("HOME", "/")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("uproxy 0."), done.stdout


def test_the_venv_the_readme_makes_is_not_committed() -> None:
    ignored = ROOT.joinpath(".gitignore").read_text().splitlines()
    assert "venv/" in ignored
