"""Importing writes a checkpoint directory that computes what the release computes.

A random official-layout checkpoint of a shrunken paper preset is imported and loaded the way
`pae-export` loads it; its tokenizer and generator are compared with an independent forward pass
written on the release's own tensor names (tests/export/official_reference.py), within float rounding.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from export.importer.cli import main
from export.importer.release import Inputs, import_release
from export.importer.synthetic import random_state, write_release_files
from export.importer.vfm_folder import HF_PREFIX, to_v5
from model.checkpoint import load_checkpoint
from model.vfm.base import normalize_image
from tests.export import official_reference as ref
from tests.export.release_fixtures import small_preset, small_tables

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def release_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    preset = small_preset()
    pae, dit = small_tables(preset)
    return write_release_files(tmp_path_factory.mktemp("release"), pae, dit, preset, seed=3)


@pytest.fixture(scope="module")
def imported(release_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "ckpt"
    import_release(
        out,
        Inputs(release_files["pae"], release_files["dit"], release_files["latent_stats"]),
        preset=small_preset(),
    )
    return out


def _official(path: Path, entry: str) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in torch.load(path, weights_only=True)[entry].items()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_import_computes_what_the_release_computes(release_files: dict[str, Path], imported: Path) -> None:
    ckpt = load_checkpoint(imported)
    preset, pae, dit = ckpt.preset, ckpt.pae, ckpt.dit
    assert preset.pae.dam_ln_eps == 1e-5 and preset.pae.table_dtype == "float32"
    w = _official(release_files["pae"], "model")
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        x_norm = normalize_image(images, preset.pae.vfm, pae.mean, pae.std)
        h_vfm = pae.vfm.features(x_norm)
        z = pae.encode(images)
        z_ref = ref.pae_encode(w, x_norm, h_vfm, heads=4, eps=1e-5)
        assert _rel(z, z_ref) < 1e-5
        x_hat = pae.decode(z_ref)
        x_ref = ref.pae_decode(w, z_ref, heads=4, dec_heads=4, mean=pae.mean, std=pae.std)
        assert _rel(x_hat, x_ref) < 1e-5

        wd = _official(release_files["dit"], "ema")
        x = torch.randn(3, 8, 4, 4, generator=generator)
        t = torch.tensor([0.1, 0.5, 0.9])
        y = torch.tensor([0, 7, 1000])
        assert _rel(dit(x, t, y), ref.dit_forward(wd, x, t, y, heads=4)) < 1e-5


def test_the_vfm_folder_holds_the_checkpoints_encoder(release_files: dict[str, Path], imported: Path) -> None:
    w = torch.load(release_files["pae"], weights_only=True)["model"]
    written = load_file(str(imported / "vfm" / "model.safetensors"))
    encoder = {to_v5(k[len(HF_PREFIX) :]): v for k, v in w.items() if k.startswith(HF_PREFIX)}
    assert set(written) == set(encoder) | {"layernorm.weight", "layernorm.bias"}
    assert all(torch.equal(written[k], v) for k, v in encoder.items())
    assert json.loads((imported / "vfm" / "config.json").read_text())["model_type"] == "dinov2_with_registers"


def test_transformers4_encoder_names_give_the_same_folder(tmp_path: Path, imported: Path) -> None:
    preset = small_preset()
    pae, dit = small_tables(preset, v4_names=True)
    assert any(".attention.attention.query." in name for name in pae)
    files = write_release_files(tmp_path / "v4", pae, dit, preset, seed=3)
    out = tmp_path / "ckpt"
    import_release(out, Inputs(files["pae"], files["dit"], files["latent_stats"]), preset=preset)
    first, second = (load_file(str(d / "vfm" / "model.safetensors")) for d in (imported, out))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_model_card_and_config_record_sources_and_choices(
    release_files: dict[str, Path], imported: Path
) -> None:
    card = (imported / "MODEL_CARD.md").read_text()
    report = json.loads((imported / "import.json").read_text())
    for source in report["sources"]:
        assert source["sha256"] in card and Path(source["file"]).name in card
    dit_source = next(s for s in report["sources"] if s["role"] == "LightningDiT")
    assert dit_source["entry"] == "ema" and dit_source["entries_not_read"] == ["config"]
    config = json.loads((imported / "config.json").read_text())
    assert all((p.stat().st_mode & 0o777) in (0o644, 0o755) for p in (imported, *imported.rglob("*")))
    assert config["sampler"]["grid"] == "release" and report["sampler"]["default"] == "release-80ep"
    assert config["pae"]["vfm"]["path"] == str((imported / "vfm").resolve())


def test_ema_entry_is_read_when_asked(tmp_path: Path, release_files: dict[str, Path]) -> None:
    state = torch.load(release_files["pae"], weights_only=True)["model"]
    moved = {k: v + 1.0 if k == "decoder.decoder_embed.bias" else v for k, v in state.items()}
    torch.save({"model": state, "ema": moved}, tmp_path / "pae.pt")
    inputs = Inputs(tmp_path / "pae.pt", release_files["dit"], release_files["latent_stats"])
    out = tmp_path / "ema"
    report = import_release(out, inputs, preset=small_preset(), pae_weights="ema")
    assert report["weights"]["PAE tokenizer"] == "ema"
    written = load_file(str(out / "pae.safetensors"))
    assert torch.equal(written["decoder.embed.bias"], moved["decoder.decoder_embed.bias"])


def test_cli_check_reports_and_refuses_a_second_write(
    tmp_path: Path, release_files: dict[str, Path], imported: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--pae", str(release_files["pae"]), "--dit", str(release_files["dit"])]
    assert main([*argv, "--check"]) == 1  # the shrunken preset is not a registered one
    assert "no preset of this project fits" in capsys.readouterr().err
    stats = ["--latent-stats", str(release_files["latent_stats"])]
    assert main([*argv, *stats, "--out", str(imported)]) == 1
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(argv)  # neither --out nor --check


def test_a_missing_vfm_needs_vfm_dir(tmp_path: Path, release_files: dict[str, Path]) -> None:
    state = torch.load(release_files["pae"], weights_only=True)["model"]
    torch.save(
        {"model": {k: v for k, v in state.items() if not k.startswith("encoder.")}}, tmp_path / "pae.pt"
    )
    with pytest.raises(ValueError, match=r"holds no frozen encoder.*--vfm-dir"):
        import_release(None, Inputs(tmp_path / "pae.pt"), preset=small_preset())


def test_random_state_sets_fixed_tables_to_their_true_values() -> None:
    preset = small_preset()
    pae, _ = small_tables(preset)
    from export.importer.synthetic import fixed_tables

    fixed = fixed_tables(preset)
    state = random_state(pae, fixed, seed=0)
    assert torch.equal(state["decoder.decoder_pos_embed"], fixed["decoder.decoder_pos_embed"])
