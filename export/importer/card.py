"""The imported checkpoint's model card: where every file came from and what the import checked."""

from __future__ import annotations

from model.presets import Preset


def _sources(report: dict) -> list[str]:
    lines = ["| role | file | bytes | sha256 | entry read |", "|---|---|---|---|---|"]
    for s in report["sources"]:
        lines.append(
            f"| {s['role']} | `{s['file']}` | {s['bytes']:,} | `{s['sha256']}` | {s['entry'] or '—'} |"
        )
        for shard, digest in s.get("shards", {}).items():
            lines.append(f"| shard | `{shard}` | | `{digest}` | |")
    not_read = [
        f"- `{s['file']}`: entries not read {s['entries_not_read']}"
        + (
            f"; pickled objects refused (never imported or run): {s['refused_pickled_objects']}"
            if s["refused_pickled_objects"]
            else ""
        )
        for s in report["sources"]
        if s["entries_not_read"] or s["refused_pickled_objects"]
    ]
    return lines + (["", *not_read] if not_read else [])


def model_card(report: dict, preset: Preset) -> str:
    """Markdown: preset, sources with sha256, tensor accounting, fixed-table checks, samplers, VFM."""
    tensors = report["tensors"]
    fixed = [
        f"- `{name}`: max |stored − recomputed| = {diff:.2e}"
        for part in ("pae", "dit")
        for name, diff in tensors.get(part, {}).get("fixed_tables_max_abs_diff", {}).items()
    ]
    vfm = report.get("vfm", {})
    vfm_line = (
        f"written to `vfm/` from the checkpoint's {vfm.get('tensors')} frozen-encoder tensors"
        if vfm.get("origin") == "checkpoint"
        else f"the Hugging Face folder `{preset.pae.vfm.path}` (given with --vfm-dir)"
    )
    lines = [
        f"# {preset.name} — imported from the authors' release",
        "",
        "Converted by `pae-import`: the authors' weights under this project's names, for the paper "
        f"preset `{preset.name}` (architecture read off the tensors and checked against it).",
        "",
        "## Sources",
        "",
        *_sources(report),
        "",
        "## What was checked",
        "",
        f"- Tokenizer: {tensors.get('pae', {}).get('official', 0)} official tensors, every one mapped to one of "
        f"{tensors.get('pae', {}).get('parameters', 0)} parameters, a fixed table or the frozen encoder.",
        f"- Generator: {tensors.get('dit', {}).get('official', 0)} official tensors → "
        f"{tensors.get('dit', {}).get('parameters', 0)} parameters and fixed tables "
        f"(qk-norm {'on' if preset.dit.use_qknorm else 'off'}).",
        "- Fixed tables compared with this project's recomputation:",
        *fixed,
        f"- Frozen encoder: {vfm_line}.",
        f"- Weights read: {report['weights']}.",
        "",
        "## Sampler presets",
        "",
        f"Default `{report['sampler']['default']}`; a request may pick any of {report['sampler']['presets']} "
        "(paper §3.6–3.7).",
        "",
    ]
    return "\n".join(lines)
