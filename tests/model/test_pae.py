"""PAE tokenizer: parameter counts at paper scale, DAM identity at init, sphere, shapes, VFM handling."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.pae import FUSIONS, PAE, Attention, PAEConfig, sphere_norm, unpatchify
from model.presets import get_preset
from model.vfm import build_vfm


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tiny_cfg() -> PAEConfig:
    return get_preset("fmnist32-tiny").pae


@pytest.fixture(scope="module")
def tiny_pae(tiny_cfg) -> PAE:
    torch.manual_seed(0)
    return PAE(tiny_cfg, build_vfm(tiny_cfg.vfm))


def test_paper_dinov2l_parameter_counts_on_meta():
    cfg = get_preset("imagenet256-dinov2l").pae
    with torch.device("meta"):
        pae = PAE(cfg)  # no VFM weights needed
    total = n_params(pae)
    assert abs(total - 417e6) / 417e6 < 0.03, total
    assert abs(n_params(pae.dam) - 103.5e6) / 103.5e6 < 0.01, n_params(pae.dam)
    assert abs(n_params(pae.decoder) - 304e6) / 304e6 < 0.01, n_params(pae.decoder)
    assert abs(n_params(pae.projector) - 4.5e6) / 4.5e6 < 0.02
    assert abs(n_params(pae.deprojector) - 4.5e6) / 4.5e6 < 0.02
    assert all(p.requires_grad for p in pae.parameters())
    # Checkpoint = parameters only; no fixed tables, no VFM.
    assert set(pae.state_dict()) == {name for name, _ in pae.named_parameters()}


@pytest.mark.parametrize("fusion", FUSIONS)
def test_dam_starts_as_layernorm_of_vfm_tokens(tiny_cfg, fusion):
    torch.manual_seed(1)
    pae = PAE(dataclasses.replace(tiny_cfg, fusion=fusion))
    x_norm = torch.randn(2, 3, 128, 128)
    h_vfm = torch.randn(2, 64, 112) * 2.0 + 0.5
    out = pae.dam(x_norm, h_vfm)
    assert torch.equal(out, pae.dam.out_norm(h_vfm))
    assert torch.allclose(out, F.layer_norm(h_vfm, (112,), eps=1e-6), atol=1e-6)
    if fusion != "none":
        with torch.no_grad():
            pae.dam.fuse.weight.normal_(0, 0.02)
        assert not torch.allclose(pae.dam(x_norm, h_vfm), out, atol=1e-4)  # the pixel branch is wired in


def test_sphere_norm_puts_every_token_at_rms_one():
    torch.manual_seed(2)
    for scale in (1.0, 50.0):
        z = sphere_norm(torch.randn(3, 32, 16, 16) * scale + 0.1)
        rms = z.square().mean(dim=1).sqrt()
        assert (rms - 1).abs().max() < 1e-5
        assert torch.allclose(z.norm(dim=1), torch.full_like(rms, math.sqrt(32)), atol=1e-4)
    # Tiny tokens: eps (1e-6, inside the square root) is what keeps RMS below 1, and only by that.
    small = torch.randn(2, 32, 4, 4) * 1e-3
    ms = small.square().mean(dim=1)
    rms = sphere_norm(small).square().mean(dim=1).sqrt()
    assert torch.allclose(rms, (ms / (ms + 1e-6)).sqrt(), atol=1e-6)
    z16 = torch.randn(2, 16, 4, 4, dtype=torch.bfloat16) * 4
    out = sphere_norm(z16)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, sphere_norm(z16.float()).to(torch.bfloat16))  # computed in fp32 inside
    with pytest.raises(ValueError, match="B×d×h×w"):
        sphere_norm(torch.randn(4, 32))


def test_encode_decode_shapes_with_real_lite0(tiny_pae):
    x = torch.rand(2, 3, 32, 32)
    z = tiny_pae.encode(x)
    assert z.shape == (2, 16, 8, 8)
    pre = tiny_pae.projector(tiny_pae.dam(tiny_pae.vfm.normalize(x), tiny_pae.vfm(x)))
    ms = pre.square().mean(dim=1)
    rms = z.square().mean(dim=1).sqrt()
    # RMS is exactly sqrt(ms / (ms + eps)); 1 to within eps/ms.
    assert torch.allclose(rms, (ms / (ms + 1e-6)).sqrt(), atol=1e-6)
    assert (rms - 1).abs().max() < 1e-6 / ms.min() + 1e-6
    x_hat = tiny_pae.decode(z)
    assert x_hat.shape == (2, 3, 32, 32) and torch.isfinite(x_hat).all()
    # Cached VFM tokens give the same latent as running the VFM.
    assert torch.equal(tiny_pae.encode(x, h_vfm=tiny_pae.vfm(x)), z)
    x_hat2, z2 = tiny_pae(x)
    assert torch.equal(z2, z) and torch.equal(x_hat2, x_hat)


def test_decoder_resizes_other_latent_grids(tiny_pae):
    assert tiny_pae.decode(sphere_norm(torch.randn(1, 16, 4, 4))).shape == (1, 3, 32, 32)
    assert tiny_pae.decode(sphere_norm(torch.randn(1, 16, 12, 12))).shape == (1, 3, 32, 32)


def test_vfm_is_outside_the_state_dict_but_follows_the_module(tiny_cfg):
    vfm = build_vfm(tiny_cfg.vfm)
    pae = PAE(tiny_cfg, vfm)
    keys = set(pae.state_dict())
    assert not any("net." in k or "_blocks" in k for k in keys)
    assert keys == set(pae.trainable_state_dict())
    assert all(p.requires_grad for p in pae.parameters()) and not any(
        p.requires_grad for p in vfm.parameters()
    )
    pae.train()
    assert pae.training and not vfm.training
    pae.to(torch.float64)
    assert next(vfm.parameters()).dtype == torch.float64 and vfm.mean.dtype == torch.float64
    pae.to("meta")
    assert next(vfm.parameters()).device.type == "meta"


def test_trainable_state_dict_round_trips_through_safetensors(tiny_cfg, tiny_pae, tmp_path):
    path = tmp_path / "pae.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_pae.trainable_state_dict().items()}, str(path))
    fresh = PAE(tiny_cfg)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    z = sphere_norm(torch.randn(1, 16, 8, 8))
    assert torch.equal(fresh.decode(z), tiny_pae.decode(z))


def test_decoder_last_layer_is_the_prediction_head(tiny_pae):
    w = tiny_pae.decoder_last_layer
    assert w is tiny_pae.decoder.head.weight and w.shape == (4 * 4 * 3, 128)
    loss = tiny_pae.decode(sphere_norm(torch.randn(1, 16, 8, 8))).mean()
    (grad,) = torch.autograd.grad(loss, w)
    assert grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors(tiny_cfg, tiny_pae):
    bare = PAE(tiny_cfg)
    with pytest.raises(RuntimeError, match="no VFM attached"):
        bare.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="h_vfm must be B×64×112"):
        bare.encode(torch.rand(1, 3, 32, 32), h_vfm=torch.randn(1, 63, 112))
    with pytest.raises(ValueError, match="latent must be B×16"):
        tiny_pae.decode(torch.randn(1, 8, 8, 8))
    with pytest.raises(ValueError, match="fusion"):
        dataclasses.replace(tiny_cfg, fusion="film")
    with pytest.raises(ValueError, match="decoder_patch"):
        dataclasses.replace(tiny_cfg, decoder_patch=5)
    other = dataclasses.replace(tiny_cfg.vfm, input_size=160, grid=10)
    with pytest.raises(ValueError, match=r"differs from PAEConfig\.vfm"):
        PAE(tiny_cfg, build_vfm(other))


def test_attention_matches_the_textbook_formula():
    torch.manual_seed(3)
    for cross in (False, True):
        attn = Attention(16, 4, cross=cross)
        x, ctx = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
        if cross:
            q, k, v = attn.q(x), attn.k(ctx), attn.v(ctx)
        else:
            q, k, v = attn.qkv(x).chunk(3, dim=-1)
        heads = [
            torch.softmax(q[..., h * 4 : h * 4 + 4] @ k[..., h * 4 : h * 4 + 4].transpose(1, 2) / 2.0, dim=-1)
            @ v[..., h * 4 : h * 4 + 4]
            for h in range(4)
        ]
        expected = attn.proj(torch.cat(heads, dim=-1))
        assert torch.allclose(attn(x, ctx if cross else None), expected, atol=1e-5)


def test_unpatchify_layout():
    g, p = 2, 3
    patches = torch.arange(g * g * p * p * 3, dtype=torch.float32).reshape(1, g * g, p * p * 3)
    img = unpatchify(patches, g, p)
    assert img.shape == (1, 3, g * p, g * p)
    for i, j, a, b, c in [(0, 1, 2, 0, 1), (1, 0, 1, 2, 2), (1, 1, 0, 0, 0)]:
        assert img[0, c, i * p + a, j * p + b] == patches[0, i * g + j, (a * p + b) * 3 + c]


def test_residual_free_mixers_start_near_the_identity(tiny_cfg):
    """Uniform attention would give every position the same token; the init keeps tokens apart."""
    torch.manual_seed(0)
    pae = PAE(tiny_cfg)
    n, dim = tiny_cfg.vfm.grid**2, tiny_cfg.vfm.dim
    tokens = F.layer_norm(torch.randn(2, n, dim), (dim,))
    out = pae.projector.attn(tokens)
    assert F.cosine_similarity(out, tokens, dim=-1).min() > 0.99
    assert out.std(dim=1).mean() > 0.9  # positions still differ (uniform attention gives ~0)
    z = sphere_norm(torch.randn(2, tiny_cfg.latent_dim, tiny_cfg.vfm.grid, tiny_cfg.vfm.grid))
    h = pae.deprojector.conv(z).flatten(2).transpose(1, 2)
    assert F.cosine_similarity(pae.deprojector.attn(h), h, dim=-1).mean() > 0.95


def test_near_identity_init_is_for_self_attention_only():
    with pytest.raises(ValueError, match="self-attention"):
        Attention(8, 2, cross=True).init_near_identity()
