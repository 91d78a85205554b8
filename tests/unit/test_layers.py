"""The house rules are enforced by import-linter: the real tree keeps them, and a scratch copy that breaks
one (the pipeline importing the sandbox) fails with the contract named."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.paths import ROOT

LINT = str(Path(sys.executable).with_name("lint-imports"))


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [LINT, str(tree / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=240,
    )


def _scratch_copy(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "consumer", tree / "consumer", ignore=shutil.ignore_patterns("__pycache__", "_models"))
    shutil.copy(ROOT / "pyproject.toml", tree / "pyproject.toml")
    return tree


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = _lint(_scratch_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_pipeline_importing_the_sandbox_breaks_the_layers(tmp_path: Path) -> None:
    tree = _scratch_copy(tmp_path)
    pipeline = tree / "consumer" / "stream" / "pipeline.py"
    pipeline.write_text(pipeline.read_text() + "\nimport consumer.sandbox.reviewgen  # noqa: E402, F401\n")
    result = _lint(tree)
    assert result.returncode != 0
    assert "consumer.stream.pipeline -> consumer.sandbox.reviewgen" in result.stdout
    assert "The service never imports offline or sandbox BROKEN" in result.stdout
