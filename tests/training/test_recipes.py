"""Recipes: one per preset, paper values where the paper (or RAE's stage 1) gives them, the shipped
checkpoint trained with exactly the default recipe, and every field validated."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from model.presets import PRESETS
from training.distributed import DistEnv
from training.recipes import (
    RECIPES,
    DataConfig,
    EvaluateConfig,
    GeneratorTrainConfig,
    Recipe,
    RefineConfig,
    TokenizerTrainConfig,
    get_recipe,
)
from training.stages.context import STAGES, resolve_context

CHECKPOINT = Path(__file__).resolve().parents[2] / "checkpoints" / "fmnist32-tiny"
CPU1 = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_every_preset_has_a_recipe() -> None:
    assert set(RECIPES) == set(PRESETS)
    for name in RECIPES:
        assert isinstance(get_recipe(name), Recipe)
    with pytest.raises(ValueError, match="no training recipe"):
        get_recipe("imagenet512")


def test_paper_recipe_values() -> None:
    recipe = get_recipe("imagenet256-dinov2l")
    t = recipe.tokenizer
    assert (t.lpips_weight, t.gan_weight, t.ssr_weight, t.mcr_weight, t.scr_weight) == (
        1.0,
        0.5,
        0.2,
        0.5,
        1.0,
    )
    assert t.mcr_angles == (42.5, 85.0) and t.disc_start_step < t.gan_start_step < t.steps
    assert (t.batch_size, t.steps, t.lr, t.lr_min, t.ema_decay) == (512, 16 * 2502, 2e-4, 2e-5, 0.9978)
    g = recipe.generator
    assert (
        g.batch_size,
        g.steps,
        g.lr,
        g.betas,
        g.weight_decay,
        g.ema_decay,
        g.train_shift,
        g.grad_clip,
    ) == (
        1024,
        100_000,
        2e-4,
        (0.9, 0.95),
        0.0,
        0.9999,
        0.7,
        None,
    )
    assert recipe.refine.depth == 4 and recipe.evaluate.gen_num_samples == 50_000
    assert recipe.evaluate.split == "val" and recipe.data.train_per_class == 0


def test_the_shipped_checkpoint_was_trained_with_the_default_recipe() -> None:
    """config.json holds the recipe section by section, and every stage record matches the settings
    the preset and recipe give today: `make train` into the shipped directory skips every stage."""
    ctx = resolve_context("fmnist32-tiny", CHECKPOINT, {}, "all", CPU1)
    config = json.loads((CHECKPOINT / "config.json").read_text())
    assert set(config["recipe"]) == {"refine", "tokenizer", "generator", "evaluate", "data"}
    assert config["recipe"]["tokenizer"]["steps"] == ctx.recipe.tokenizer.steps == 2000
    assert config["recipe"]["data"] == {"train_per_class": 2000}
    for stage in STAGES:
        assert ctx.is_done(stage), f"the shipped {stage} record does not match the default recipe"


def test_fields_are_validated() -> None:
    recipe = get_recipe("fmnist32-tiny")
    with pytest.raises(ValueError, match="mcr_angles"):
        dataclasses.replace(recipe.tokenizer, mcr_angles=(85.0, 42.5))
    with pytest.raises(ValueError, match=r"GeneratorTrainConfig\.batch_size must be a positive int"):
        dataclasses.replace(recipe.generator, batch_size=0)
    with pytest.raises(ValueError, match=r"TokenizerTrainConfig\.steps must be a positive int, got True"):
        dataclasses.replace(recipe.tokenizer, steps=True)
    with pytest.raises(ValueError, match=r"TokenizerTrainConfig\.betas"):
        dataclasses.replace(recipe.tokenizer, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"RefineConfig\.warmup_steps must be an int ≥ 0"):
        dataclasses.replace(recipe.refine, warmup_steps=-1)
    with pytest.raises(ValueError, match="lr_min must be <= lr"):
        dataclasses.replace(recipe.refine, lr_min=1.0)
    with pytest.raises(ValueError, match="cannot both be 0"):
        dataclasses.replace(recipe.refine, rep_weight=0.0, gram_weight=0.0)
    with pytest.raises(ValueError, match=r"EvaluateConfig\.fd_network must be one of"):
        EvaluateConfig(fd_network="vgg")
    with pytest.raises(ValueError, match=r"DataConfig\.train_per_class"):
        DataConfig(train_per_class=-1)
    assert RefineConfig(steps=1, batch_size=1, lr=1.0, lr_min=1.0, warmup_steps=0, depth=1).lr_min == 1.0
    assert TokenizerTrainConfig(batch_size=1, steps=1, warmup_steps=0).lpips_net == "vgg"
    assert GeneratorTrainConfig(batch_size=1, steps=1).sample_every == 1000
