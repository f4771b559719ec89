"""The parity gate: every exported graph must reproduce torch on real inputs before it is published.

Each graph is run in ONNX Runtime (CPU EP) at batch 1 and an odd batch on real images (and the real
latents and labels derived from them) and compared with the torch model's own public API — not with
the export wrapper — so a mistake in a wrapper (say, the CFG combination) fails the gate too.

Two error measures, both must be within tolerance:
- `max_abs` = max |ort − torch| over every element: catches a single broken pixel or token;
- `rel` = ‖ort − torch‖₂ / ‖torch‖₂: catches a small error spread over everything, independent of
  the output's scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model.validation import non_negative_numbers


@dataclass(frozen=True)
class Tolerance:
    """Largest accepted `max_abs` and `rel` error for one graph."""

    max_abs: float
    rel: float

    def __post_init__(self) -> None:
        non_negative_numbers(self, "max_abs", "rel")


# fp32 graphs differ from eager torch only by operator fusion and summation order: errors of a few
# 1e-6 relative are typical; the bounds leave an order of magnitude of headroom while still failing
# any real bug (a wrong normalisation or CFG sign gives errors of order 1). Encoder latents and DiT
# velocities are O(1) per element; decoder pixels are in [0, 1].
TOLERANCES_FP32: dict[str, Tolerance] = {
    "encoder": Tolerance(max_abs=2e-3, rel=1e-4),
    "decoder": Tolerance(max_abs=1e-3, rel=1e-4),
    "dit": Tolerance(max_abs=2e-3, rel=1e-4),
    "dit_cond": Tolerance(max_abs=2e-3, rel=1e-4),
}
# fp16 graphs are compared with the fp32 torch model, so they carry fp16 rounding (about 1e-3
# relative per operation, compounded over depth). The bounds admit that while still rejecting a
# broken graph, whose relative error would be of order 1.
TOLERANCES_FP16: dict[str, Tolerance] = {
    "encoder": Tolerance(max_abs=0.15, rel=2e-2),
    "decoder": Tolerance(max_abs=0.05, rel=1e-2),
    "dit": Tolerance(max_abs=0.1, rel=1e-2),
    "dit_cond": Tolerance(max_abs=0.1, rel=1e-2),
}


@dataclass(frozen=True)
class ParityCase:
    """One graph's inputs at one batch size and the torch output they must reproduce."""

    graph: str
    inputs: Mapping[str, np.ndarray]
    expected: np.ndarray
    source: str

    @property
    def batch(self) -> int:
        return int(self.expected.shape[0])


@dataclass(frozen=True)
class ParityResult:
    """Measured errors of one case against its tolerance."""

    graph: str
    batch: int
    max_abs: float
    rel: float
    tolerance: Tolerance
    source: str

    @property
    def passed(self) -> bool:
        return self.max_abs <= self.tolerance.max_abs and self.rel <= self.tolerance.rel

    def to_dict(self) -> dict:
        return {
            "graph": self.graph,
            "batch": self.batch,
            "max_abs": self.max_abs,
            "rel": self.rel,
            "tolerance": asdict(self.tolerance),
            "passed": self.passed,
            "inputs": self.source,
        }


class ParityError(RuntimeError):
    """At least one graph disagrees with torch beyond its tolerance; nothing may be published."""

    def __init__(self, failures: Sequence[ParityResult]) -> None:
        self.failures = list(failures)
        lines = [
            f"{r.graph} @ batch {r.batch}: max_abs {r.max_abs:.3g} (tolerance {r.tolerance.max_abs:.3g}), "
            f"rel {r.rel:.3g} (tolerance {r.tolerance.rel:.3g}) on {r.source}"
            for r in self.failures
        ]
        super().__init__("ONNX graphs failed the parity gate against torch:\n  " + "\n  ".join(lines))


def errors(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """(max_abs, rel) between two arrays of the same shape; NaN or Inf anywhere counts as infinite."""
    if actual.shape != expected.shape:
        raise ValueError(f"output shape {actual.shape} differs from torch's {expected.shape}")
    a = actual.astype(np.float64)
    e = expected.astype(np.float64)
    if not (np.isfinite(a).all() and np.isfinite(e).all()):
        return float("inf"), float("inf")
    diff = a - e
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    norm = float(np.linalg.norm(e))
    rel = float(np.linalg.norm(diff)) / norm if norm > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, rel


def ort_session(path: Path, threads: int = 1):
    """A CPU ONNX Runtime session with full graph optimisation and spinning off (cores are shared)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def measure(session, cases: Sequence[ParityCase], tolerance: Tolerance) -> list[ParityResult]:
    """Run every case through `session` and measure it against `tolerance` (no raising here)."""
    results = []
    for case in cases:
        (actual,) = session.run(None, {k: np.ascontiguousarray(v) for k, v in case.inputs.items()})
        max_abs, rel = errors(actual, case.expected)
        results.append(ParityResult(case.graph, case.batch, max_abs, rel, tolerance, case.source))
    return results


def enforce(results: Sequence[ParityResult]) -> None:
    """Raise ParityError listing every failing case; pass silently when all are within tolerance."""
    failures = [r for r in results if not r.passed]
    if failures:
        raise ParityError(failures)
