"""The parity gate's arithmetic and reporting, independent of any model."""

from __future__ import annotations

import numpy as np
import pytest

from export.parity import (
    TOLERANCES_FP16,
    TOLERANCES_FP32,
    ParityError,
    ParityResult,
    Tolerance,
    enforce,
    errors,
)


def test_errors_are_max_abs_and_relative_l2() -> None:
    expected = np.array([[3.0, 4.0]], dtype=np.float32)
    actual = np.array([[3.0, 4.5]], dtype=np.float32)
    max_abs, rel = errors(actual, expected)
    assert max_abs == pytest.approx(0.5)
    assert rel == pytest.approx(0.5 / 5.0)
    assert errors(expected, expected) == (0.0, 0.0)


def test_non_finite_outputs_and_shape_mismatches_fail() -> None:
    expected = np.ones((2, 3), dtype=np.float32)
    assert errors(np.full((2, 3), np.nan, dtype=np.float32), expected) == (float("inf"), float("inf"))
    with pytest.raises(ValueError, match=r"output shape \(3, 2\) differs from torch's \(2, 3\)"):
        errors(np.ones((3, 2), dtype=np.float32), expected)
    assert errors(np.ones((1,)), np.zeros((1,)))[1] == float("inf")


def test_enforce_lists_every_failure_with_numbers() -> None:
    tol = Tolerance(max_abs=1e-3, rel=1e-4)
    ok = ParityResult("decoder", 1, 1e-4, 1e-5, tol, "fashion-mnist/t10k/0")
    bad_abs = ParityResult("encoder", 3, 0.5, 1e-5, tol, "skimage/astronaut")
    bad_rel = ParityResult("dit", 1, 1e-4, 0.2, tol, "noised latents")
    assert ok.passed and not bad_abs.passed and not bad_rel.passed
    enforce([ok])
    with pytest.raises(ParityError) as info:
        enforce([ok, bad_abs, bad_rel])
    message = str(info.value)
    assert "encoder @ batch 3: max_abs 0.5 (tolerance 0.001)" in message
    assert "dit @ batch 1" in message and "rel 0.2 (tolerance 0.0001)" in message
    assert "decoder" not in message
    assert info.value.failures == [bad_abs, bad_rel]
    assert bad_abs.to_dict()["tolerance"] == {"max_abs": 1e-3, "rel": 1e-4}


def test_every_graph_has_stated_tolerances_and_fp16_is_looser() -> None:
    graphs = {"encoder", "decoder", "dit", "dit_cond"}
    assert set(TOLERANCES_FP32) == graphs == set(TOLERANCES_FP16)
    for graph in graphs:
        assert TOLERANCES_FP32[graph].rel < TOLERANCES_FP16[graph].rel < 0.05
    with pytest.raises(ValueError, match=r"Tolerance\.max_abs must be a finite number ≥ 0"):
        Tolerance(max_abs=-1.0, rel=0.0)
