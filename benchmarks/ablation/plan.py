"""One harness invocation (`Plan`): the budget, where everything goes, and how each stage of each arm
is configured; the judge every arm shares."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.ablation.budgets import ARMS, Budget, budget_sets
from model import checkpoint
from model.presets import Preset
from training.distributed import DistEnv
from training.recipes import get_recipe
from training.stages.context import StageContext, resolve_context

CHECKPOINTS_DIR = Path(__file__).resolve().parents[2] / "checkpoints"


class AblationError(RuntimeError):
    """An --out directory that cannot be resumed into this run (other settings, or a lost point)."""


def needs_refine(ctx: StageContext) -> bool:
    """The tokenizer reads the refined targets only through SSR and SCR."""
    tok = ctx.recipe.tokenizer
    return tok.ssr_weight > 0 or tok.scr_weight > 0


@dataclass
class Plan:
    """One harness invocation: the budget, where everything goes, and how stages are configured."""

    budget: Budget
    preset: str
    out: Path
    env: DistEnv
    seeds: tuple[int, ...]
    arms: tuple[str, ...]
    cache: str | None = None
    dataset: str | None = None
    data_root: str | None = None
    extra_sets: dict[str, str] = field(default_factory=dict)

    def sets(self, arm: str) -> dict[str, str]:
        """Budget overrides, then the caller's `--set`, then the arm's own (zeroed loss weights, its
        latent): a `--set tokenizer.ssr_weight=…` changes SSR's weight in the arms that train with SSR
        only. An RAE arm's DiT is widened when RAE's rule asks for it (`rae_dit_width`)."""
        sets = {**budget_sets(self.budget, get_recipe(self.preset)), **self.extra_sets, **ARMS[arm]}
        if ARMS[arm].get("autoencoder.kind") == "rae":
            probe = resolve_context(self.preset, self.out, sets, "generator", self.env)
            sets.update(rae_dit_width(probe.preset))
        return sets

    def runs(self) -> list[tuple[int, str]]:
        """(seed, arm) pairs in the order they train: every arm at the first seed, then the rest."""
        out = [(self.seeds[0], arm) for arm in self.arms]
        for seed in self.seeds[1:]:
            out += [(seed, arm) for arm in self.arms if arm in self.budget.seeded_arms]
        return out

    def arm_dir(self, seed: int, arm: str) -> Path:
        return self.out / f"seed{seed}" / arm

    @property
    def classifier(self) -> Path:
        """The conditional-accuracy classifier every arm is judged by (copied into each arm)."""
        return self.out / checkpoint.CLASSIFIER_FILE

    def context(
        self, directory: Path, arm: str, stage: str, seed: int, stop_at: int | None = None
    ) -> StageContext:
        return resolve_context(
            self.preset,
            directory,
            self.sets(arm),
            stage,
            self.env,
            cache=self.cache,
            seed=seed,
            data_root=self.data_root,
            dataset=self.dataset or self.budget.dataset,
            stop_at=stop_at,
        )

    def settings(self) -> dict[str, Any]:
        """What the numbers depend on; an --out directory holding other settings is refused."""
        return {
            "budget": self.budget.name,
            "preset": self.preset,
            "dataset": self.dataset or self.budget.dataset,
            "data_root": self.data_root,
        }


def rae_dit_width(preset: Preset) -> dict[str, str]:
    """RAE's rule (arXiv 2510.11690, §4: a DiT narrower than the token width cannot fit RAE latents):
    the `dit.hidden` override that makes the width at least the latent's channel count, the next
    multiple of what the heads and the 2-D sin-cos table need; {} when the preset's DiT is wide enough
    (the default: 192 ≥ 112, so the RAE arm's DiT is everyone's)."""
    channels, dit = preset.latent_shape[0], preset.dit
    if dit.hidden >= channels:
        return {}
    step = math.lcm(dit.heads, 4)
    return {"dit.hidden": str(-(-channels // step) * step)}


def shipped_classifier(plan: Plan) -> Path | None:
    """The preset's committed conditional-accuracy judge, when this run's evaluate stage would train the same
    one: the preset's own data and classifier settings. The evaluate stage trains it from a fixed seed on
    the training split (~150 s on 2 cores), and the one it trained for the quick run at 2 threads is
    byte-identical to the committed file, so reusing it saves that time and makes `cond_acc` the
    default model's judge. None for another dataset, data root or `data.*` / `evaluate.classifier_*` set."""
    if plan.dataset or plan.budget.dataset or plan.data_root:
        return None
    keys = [*dict(plan.budget.sets), *plan.extra_sets]
    if any(k.startswith(("data.", "evaluate.classifier_")) for k in keys):
        return None
    path = CHECKPOINTS_DIR / plan.preset / checkpoint.CLASSIFIER_FILE
    return path if path.is_file() else None


def say(message: str) -> None:
    """Progress on stderr, so stdout keeps only the table and the claims."""
    print(f"[ablation] {message}", file=sys.stderr, flush=True)
