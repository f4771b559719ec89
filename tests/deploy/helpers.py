"""Shared helpers for the deployment tests: paths, rendering, the contract tables, PromQL names.

The contract (docs/INTERFACES.md) is parsed rather than copied, so a metric or setting renamed there
fails these tests until the dashboard, rules and manifests follow.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
INTERFACES = REPO / "docs" / "INTERFACES.md"
VENV_BIN = Path(sys.executable).parent
TASKS = ("encode", "decode", "generate")
# Every rendered deployment: an overlay and the components added to it.
VARIANTS = {
    "cpu": ("overlays/cpu", []),
    "gpu": ("overlays/gpu", []),
    "gpu+tensorrt": ("overlays/gpu", ["components/tensorrt"]),
    "cpu+external-redis": ("overlays/cpu", ["components/external-redis"]),
    "cpu+redis-sentinel": ("overlays/cpu", ["components/redis-sentinel"]),
    "cpu+models-volume": ("overlays/cpu", ["components/models-volume"]),
}
# Series Prometheus makes itself for every target; not exported by the service.
PROMETHEUS_SYNTHETIC = {"up"}
# Labels Prometheus attaches or histograms carry, on top of the contract's labels.
IMPLICIT_LABELS = {"le", "job", "instance", "role"}


def tool(name: str) -> str | None:
    """A command-line tool from the virtual environment first, then PATH."""
    if (VENV_BIN / name).is_file():
        return str(VENV_BIN / name)
    return shutil.which(name)


def kustomize(path: Path) -> list[dict]:
    """Render a kustomization with `kubectl kustomize`; the documents as dicts."""
    kubectl = tool("kubectl")
    if kubectl is None:
        raise RuntimeError("kubectl not found on PATH; it renders the kustomize overlays")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def load_stack() -> ModuleType:
    """deploy/stack.py as a module (deploy/ is not a package: it ships scripts, not a library)."""
    spec = importlib.util.spec_from_file_location("pae_deploy_stack", DEPLOY / "stack.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _section(title: str) -> str:
    text = INTERFACES.read_text()
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 3)
    return text[start : end if end != -1 else None]


@cache
def contract_metrics() -> dict[str, tuple[str, frozenset[str]]]:
    """{metric name: (type, labels)} from the "Service metrics" table."""
    rows = re.findall(
        r"^\|\s*`(pae_\w+)`\s*\|\s*([^|]+?)\s*\|\s*([^|]*?)\s*\|", _section("Service metrics"), re.M
    )
    if not rows:
        raise AssertionError(f"no metric rows found in the Service metrics table of {INTERFACES}")
    return {
        name: (kind.split()[0], frozenset(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", labels))))
        for name, kind, labels in rows
    }


@cache
def contract_settings() -> frozenset[str]:
    """Every environment variable of the "Service settings" section, <TASK> expanded per task."""
    names = set()
    for token in re.findall(r"`([A-Z][A-Z0-9_<>]*)`", _section("Service settings")):
        if "<TASK>" in token:
            names.update(token.replace("<TASK>", task.upper()) for task in TASKS)
        else:
            names.add(token)
    if not names:
        raise AssertionError(f"no settings found in the Service settings section of {INTERFACES}")
    return frozenset(names)


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}  # fmt: skip
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER_LABEL = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels and durations excluded)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _LABEL_LIST.sub(" ", text)
    return {
        m.group(1) for m in _IDENT.finditer(text) if not m.group(2) and m.group(1).lower() not in _KEYWORDS
    }


def promql_labels(expr: str) -> dict[str | None, set[str]]:
    """Labels used per selector ({metric: labels in its matchers}) and under None those in by()/on() lists."""
    text = _STRING.sub('""', expr)
    used: dict[str | None, set[str]] = {None: set()}
    for match in _SELECTOR.finditer(text):
        used.setdefault(match.group(1) or "", set()).update(_MATCHER_LABEL.findall(match.group(2)))
    for match in _LABEL_LIST.finditer(text):
        used[None].update(label.strip() for label in match.group(1).split(",") if label.strip())
    return used


def contract_base(name: str) -> str | None:
    """The contract metric a series name belongs to (histogram series map to their family)."""
    table = contract_metrics()
    if name in table:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if name.endswith(suffix) and table.get(base, ("",))[0] == "histogram":
            return base
    return None


def pod_templates(docs: list[dict]) -> dict[str, dict]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet")
    }


def first_container(docs: list[dict], workload: str) -> dict:
    return pod_templates(docs)[workload]["spec"]["containers"][0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and In/NotIn/Exists/DoesNotExist)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and labels.get(key) in values)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True
