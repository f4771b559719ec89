"""`.pt` files are read for tensors only: nothing a pickle names is ever imported or run."""

from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from export.importer.release import Inputs, plan_import
from export.importer.sources import read_weights
from export.importer.torch_archive import Refused, UnsafeCheckpointError, load_archive


class _RunsCode:
    """Unpickling this with a plain unpickler would run `os.system(command)`."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class _Builds:
    """Reconstructed with NEWOBJ + BUILD (a class instance with state), not a call."""

    def __init__(self) -> None:
        self.secret = "state"


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2), "hook": _RunsCode(f"touch {marker}")}}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        read_weights(path, "PAE tokenizer", ("model",))
    assert "hook = posix.system" in str(err.value) or "hook = nt.system" in str(err.value)
    assert "never imported or run" in str(err.value)
    assert not marker.exists()


def test_builtins_exec_and_eval_are_only_named(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = f"open({str(marker)!r}, 'w').write('x')"

    class _Exec:
        def __reduce__(self) -> tuple:
            return (exec, (payload,))

    path = tmp_path / "exec.pt"
    torch.save({"ema": {"w": torch.ones(1)}, "config": _Exec()}, path)
    obj, refused = load_archive(path)
    assert refused == ["builtins.exec"] and obj["config"] == Refused("builtins.exec", (payload,))
    assert not marker.exists()


def test_objects_outside_the_weights_are_listed_not_loaded(tmp_path: Path) -> None:
    path = tmp_path / "dit.pt"
    torch.save(
        {"ema": {"w": torch.arange(3.0)}, "config": argparse.Namespace(lr=1e-4), "obj": _Builds()}, path
    )
    tensors, source = read_weights(path, "LightningDiT", ("ema", ""))
    assert torch.equal(tensors["w"].load(), torch.arange(3.0))
    assert source.entry == "ema" and source.ignored == ["config", "obj"]
    assert source.refused == ["argparse.Namespace", f"{__name__}._Builds"]


def test_parameters_bf16_and_views_are_read_exactly(tmp_path: Path) -> None:
    base = torch.randn(4, 6)
    state = {
        "p": torch.nn.Parameter(torch.randn(3)),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "view": base[1:3, ::2],
        "module.wrapped": torch.ones(2),
    }
    torch.save({"model": state}, tmp_path / "x.pt")
    tensors, _ = read_weights(tmp_path / "x.pt", "PAE tokenizer", ("model",))
    assert set(tensors) == {"p", "bf16", "view", "wrapped"}
    assert torch.equal(tensors["p"].load(), state["p"].detach())
    assert torch.equal(tensors["bf16"].load(), state["bf16"]) and tensors["bf16"].dtype == torch.bfloat16
    assert torch.equal(tensors["view"].load(), base[1:3, ::2]) and tensors["view"].shape == (2, 3)


def test_a_plain_pickle_and_a_truncated_storage_are_refused(tmp_path: Path) -> None:
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"model": {}}))
    with pytest.raises(UnsafeCheckpointError, match=r"not a torch\.save zip archive"):
        load_archive(legacy)
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(8)}}, good)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[:4] if item.filename.endswith("/data/0") else data)
    tensors, _ = read_weights(bad, "PAE tokenizer", ("model",))
    with pytest.raises(UnsafeCheckpointError, match="holds 4 bytes, expected 32"):
        tensors["w"].load()


def test_a_missing_entry_lists_the_entries_there_are(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.ones(1)}, "step": 3}, tmp_path / "x.pt")
    with pytest.raises(
        ValueError, match=r"no weights under 'model'; its entries are \['state_dict', 'step'\]"
    ):
        plan_import(Inputs(pae=tmp_path / "x.pt"))
