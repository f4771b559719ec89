"""The rendered manifests of every deployment variant, shared by the kustomize tests."""

from __future__ import annotations

import copy
import os
from functools import cache
from pathlib import Path

import pytest

from tests.deploy.helpers import K8S, VARIANTS, kustomize, tool


@cache
def _render(variant: str, tmp_root: str) -> tuple[dict, ...]:
    overlay, components = VARIANTS[variant]
    if not components:
        return tuple(kustomize(K8S / overlay))
    work = Path(tmp_root) / variant.replace("+", "-")
    work.mkdir(parents=True, exist_ok=True)
    # kustomize refuses absolute paths to other kustomizations.
    rel = [os.path.relpath(K8S / part, work) for part in (overlay, *components)]
    lines = ["apiVersion: kustomize.config.k8s.io/v1beta1", "kind: Kustomization", "resources:",
             f"  - {rel[0]}", "components:", *[f"  - {c}" for c in rel[1:]]]  # fmt: skip
    (work / "kustomization.yaml").write_text("\n".join(lines) + "\n")
    return tuple(kustomize(work))


@pytest.fixture(scope="session")
def render(tmp_path_factory):
    if tool("kubectl") is None:
        pytest.skip("kubectl not on PATH (it renders the overlays: `kubectl kustomize`)")
    root = str(tmp_path_factory.mktemp("kustomize"))
    return lambda variant: [copy.deepcopy(d) for d in _render(variant, root)]
