#!/usr/bin/env python3
"""Which Python packages the image's stages install, and at which versions.

    requirements.py deps serve        # pyproject's requirements of those extras, one per line
    requirements.py lock [--check]    # constraints.txt from the environment running this script

`deps` lets a stage install its dependencies in a layer that only a change of pyproject.toml
invalidates; the project's own source is installed afterwards with `--no-deps`, so editing it
rebuilds a few seconds of layers, not the dependencies. It needs only the standard library: it runs
inside the build before anything is installed.

`lock` pins every package that the image's stages can pull (the closure of the build backend and
the `serve`, `export` and `torch` extras, evaluated in the dev venv) to the version that environment has. The image then
runs the same ONNX Runtime, NumPy and Pillow as `make run`, which is what makes its PNGs byte-identical
to `tests/golden/`; rebuilding next month gives the same image, not whatever PyPI serves that day.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
CONSTRAINTS = HERE / "constraints.txt"
LOCKED_EXTRAS = ("serve", "export", "torch")
HEADER = (
    "# Versions of every package the image can install; `make image-constraints` rewrites this file\n"
    "# from the dev venv (deploy/docker/requirements.py lock), so the image and `make run` agree.\n"
)


def project_requirements(pyproject: Path, extras: list[str], build: bool = False) -> list[str]:
    """`dependencies` and each named extra of `pyproject` (after the build backend's requirements if
    `build`), in that order, once each; an extra that names the project itself (`pae-stack[torch]`)
    is replaced by that extra's requirements."""
    project = tomllib.loads(pyproject.read_text())
    name = canonical(project["project"]["name"])
    optional = project["project"].get("optional-dependencies", {})

    def expand(extra: str) -> list[str]:
        if extra not in optional:
            raise SystemExit(f"unknown extra {extra!r}; pyproject.toml has {sorted(optional)}")
        out = []
        for requirement in optional[extra]:
            match = re.fullmatch(r"\s*([A-Za-z0-9._-]+)\[([^\]]+)\]\s*", requirement)
            if match and canonical(match.group(1)) == name:
                out += [r for inner in match.group(2).split(",") for r in expand(inner.strip())]
            else:
                out.append(requirement)
        return out

    ordered = list(project["build-system"]["requires"]) if build else []
    ordered += project["project"].get("dependencies", [])
    for extra in extras:
        ordered += expand(extra)
    return list(dict.fromkeys(ordered))


def canonical(name: str) -> str:
    """PEP 503 normalised project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def locked_versions(pyproject: Path, extras: tuple[str, ...]) -> dict[str, str]:
    """name → installed version for the closure of the extras' requirements in this environment."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    pending = [
        (Requirement(text), frozenset()) for text in project_requirements(pyproject, list(extras), build=True)
    ]
    versions: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        requirement, parent_extras = pending.pop()
        if requirement.marker and not any(
            requirement.marker.evaluate({"extra": extra}) for extra in parent_extras or {""}
        ):
            continue
        key = (canonical(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = distribution(requirement.name)
        except PackageNotFoundError as exc:
            raise SystemExit(f"{requirement.name} is not installed here; run `make venv` first") from exc
        # A local version label (torch's "+cpu") names the index's build; the version pins the code.
        versions[canonical(requirement.name)] = dist.version.split("+", 1)[0]
        pending += [(Requirement(text), frozenset(requirement.extras)) for text in dist.requires or []]
    return versions


def lock_text(pyproject: Path) -> str:
    """The constraints file's whole text for the current environment."""
    versions = locked_versions(pyproject, LOCKED_EXTRAS)
    return HEADER + "".join(f"{name}=={versions[name]}\n" for name in sorted(versions))


def main(argv: list[str] | None = None) -> int:
    """Print `deps`, or write (or `--check`) the constraints file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    commands = parser.add_subparsers(dest="command", required=True)
    deps = commands.add_parser("deps", help="print the requirements of the named extras")
    deps.add_argument("extras", nargs="*")
    lock = commands.add_parser("lock", help="rewrite constraints.txt from this environment")
    lock.add_argument("--check", action="store_true", help="exit 1 if constraints.txt differs")
    args = parser.parse_args(argv)
    if args.command == "deps":
        print("\n".join(project_requirements(args.pyproject, args.extras)))
        return 0
    text = lock_text(args.pyproject)
    if args.check:
        if CONSTRAINTS.read_text() != text:
            print(f"{CONSTRAINTS} is out of date with this environment; run `make image-constraints`")
            return 1
        return 0
    CONSTRAINTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
