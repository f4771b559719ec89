"""Export fixtures: one tiny random checkpoint and one version exported from it, shared read-only."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.model.checkpoints import random_checkpoint, tiny_preset


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "fmnist32-tiny", tiny_preset())


@pytest.fixture(scope="session")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One version exported through the `pae-export` entry point (fp32 + fp16), shared read-only."""
    from export.cli import main

    repository = tmp_path_factory.mktemp("repo")
    argv = ["--checkpoint", str(tiny_checkpoint), "--repository", str(repository), "--fp16", "--name", "tiny"]
    assert main(argv) == 0
    return repository / "tiny" / "1"
