"""The stages on the comparison latents (`autoencoder.kind` = `rae` or `vae`): each trains, encodes,
trains a DiT on and evaluates its own latent with the shared code, and PAE's recorded settings do
not change because the option exists."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_tensors, read_json
from model.kl_autoencoder import KLAutoencoder, KLAutoencoderConfig
from training.latent_shards import LatentShards
from training.recipes import get_recipe
from training.stages.context import resolve_context
from training.stages.pipeline import run_stage
from training.stages.tokenizer import channel_stats, reconstruct_for

from .test_stages import CPU1, make_ctx, write_tiny_csv

NO_PRIOR = {"tokenizer.ssr_weight": "0", "tokenizer.mcr_weight": "0", "tokenizer.scr_weight": "0"}
STAGES = ("tokenizer", "latents", "generator", "evaluate")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cmp")
    return write_tiny_csv(root / "tiny.csv.gz"), root / "cache"


@pytest.fixture(scope="module", params=["rae", "vae"])
def trained(request: pytest.FixtureRequest, data: tuple[Path, Path], tmp_path_factory) -> tuple[str, Path]:
    torch.set_num_threads(1)
    kind, (csv, cache) = request.param, data
    out = tmp_path_factory.mktemp(kind)
    extra = {**NO_PRIOR, "autoencoder.kind": kind}
    for stage in STAGES:
        assert run_stage(make_ctx(out, csv, cache, stage, extra), stage)["finished"], stage
    return kind, out


def test_every_stage_runs_on_the_comparison_latent(trained: tuple[str, Path]) -> None:
    kind, out = trained
    channels = {"rae": 112, "vae": 16}[kind]
    config = read_json(out / "config.json")
    assert config["autoencoder"]["kind"] == kind and config["latent_shape"] == [channels, 8, 8]
    assert config["dit"]["in_channels"] == channels
    assert not (out / "pae_ema.safetensors").exists()
    weights = load_tensors(out / f"{kind}_ema.safetensors")
    assert ("latent_mean" in weights) == (kind == "rae")
    assert config["stages"]["tokenizer"]["settings"]["autoencoder"]["kind"] == kind
    assert kind in config["stages"]["tokenizer"]["settings"]  # its own recipe section (noise τ, KL weight)

    shards = LatentShards(config["stages"]["latents"]["latents_dir"])
    latents, _, labels = shards.load()
    assert latents.shape == (len(labels), channels, 8, 8)
    stats = load_tensors(out / "latent_stats.safetensors")
    assert stats["mean"].shape == (channels,)
    if kind == "rae":
        # Standardised with the training set's own channel statistics: (0, 1) again here.
        assert torch.allclose(stats["mean"], torch.zeros(channels), atol=1e-3)
        assert torch.allclose(stats["std"], torch.ones(channels), atol=1e-3)

    metrics = read_json(out / "metrics.json")
    assert {"ssc", "lpc", "gsq", "erank"} <= set(metrics["latent"])
    assert all(math.isfinite(metrics["latent"][k]) for k in ("ssc", "lpc", "gsq"))
    assert math.isfinite(metrics["gen"]["fd"]) and 0 <= metrics["gen"]["cond_acc"] <= 1
    assert ("kl" in metrics["train"]["tokenizer"]) == (kind == "vae")


def test_pae_settings_never_name_an_autoencoder(tmp_path: Path) -> None:
    pae = resolve_context("fmnist32-tiny", tmp_path, {}, "tokenizer", CPU1)
    settings = pae.stage_settings("tokenizer")
    assert "autoencoder" not in settings and "rae" not in settings and "vae" not in settings
    rae = resolve_context("fmnist32-tiny", tmp_path, {"autoencoder.kind": "rae"}, "generator", CPU1)
    assert (
        rae.preset.dit.in_channels == 112 and rae.stage_settings("generator")["autoencoder"]["kind"] == "rae"
    )


def test_a_comparison_autoencoder_refuses_the_prior_alignment_terms(
    data: tuple[Path, Path], tmp_path: Path
) -> None:
    csv, cache = data
    ctx = make_ctx(tmp_path, csv, cache, "tokenizer", {"autoencoder.kind": "vae"})
    with pytest.raises(ValueError, match=r"L1 \+ LPIPS \+ GAN only.*ssr_weight=0"):
        run_stage(ctx, "tokenizer")


class _Rows:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __getitem__(self, idx: list[int]) -> torch.Tensor:
        return self.t[idx]


def test_channel_stats_cover_every_token_of_the_requested_images() -> None:
    t = torch.randn(30, 5, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0]) + 7.0
    mean, std = channel_stats(_Rows(t), 25, chunk=7)  # rows 25… (mirror images) are left out
    flat = t[:25].double().reshape(-1, 4)
    assert torch.allclose(mean.double(), flat.mean(0), atol=1e-5)
    assert torch.allclose(std.double(), flat.std(0, unbiased=False), atol=1e-5)


def test_vae_objective_adds_ldm_scaled_kl() -> None:
    torch.manual_seed(0)
    vae = KLAutoencoder(KLAutoencoderConfig(32, 16, 8, channels=(8, 16, 16)))
    recipe = get_recipe("fmnist32-tiny")
    step = reconstruct_for("vae", recipe, 32)
    torch.manual_seed(1)
    out = step(vae, torch.rand(2, 3, 32, 32), None)
    assert out.penalty is not None and out.parts is not None
    assert float(out.penalty.detach()) == pytest.approx(
        recipe.vae.kl_weight * out.parts["kl"] / (3 * 32 * 32)
    )
    assert reconstruct_for("pae", recipe, 32)(lambda x, h: (x, h), torch.zeros(1), None).penalty is None
