"""An independent forward pass written on the release's own tensor names (paper §2.2–2.4, §3.2–3.3).

Plain `torch.nn.functional` over an official-layout state dict, sharing nothing with `model/`: an
import that maps a tensor to the wrong parameter, fuses q/k/v in the wrong order or swaps γ and β
makes this model and the imported one disagree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Weights = dict[str, torch.Tensor]


def _linear(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))


def _ln(w: Weights, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], w[f"{name}.weight"], w[f"{name}.bias"], eps)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.reshape(b, n, heads, d // heads).transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    q, k, v = (_heads(t, heads) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).flatten(2)


def _fused_attention(w: Weights, name: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    q, k, v = _linear(w, f"{name}.qkv", x).chunk(3, dim=-1)
    return _linear(w, f"{name}.proj", _attend(q, k, v, heads))


def pae_encode(w: Weights, x_norm: torch.Tensor, h_vfm: torch.Tensor, heads: int, eps: float) -> torch.Tensor:
    """DAM (sft) → projector → per-token RMS sphere; `x_norm` at the encoder's input size."""
    patch = w["delta_encoder.patch_embed.proj.weight"]
    x = F.conv2d(x_norm, patch, w["delta_encoder.patch_embed.proj.bias"], stride=patch.shape[-1])
    x = x.flatten(2).transpose(1, 2) + w["delta_encoder.pos_embed"]
    depth = len({k.split(".")[2] for k in w if k.startswith("delta_encoder.layers.")})
    for i in range(depth):
        p = f"delta_encoder.layers.{i}"
        x = x + _fused_attention(w, f"{p}.self_attn", _ln(w, f"{p}.norm1", x, eps), heads)
        q = _linear(w, f"{p}.cross_attn.q_proj", _ln(w, f"{p}.norm2_q", x, eps))
        kv = _ln(w, f"{p}.norm2_kv", h_vfm, eps)
        k, v = _linear(w, f"{p}.cross_attn.k_proj", kv), _linear(w, f"{p}.cross_attn.v_proj", kv)
        x = x + _linear(w, f"{p}.cross_attn.proj", _attend(q, k, v, heads))
        hidden = F.gelu(_linear(w, f"{p}.mlp.fc1", _ln(w, f"{p}.norm3", x, eps)))
        x = x + _linear(w, f"{p}.mlp.fc2", hidden)
    gamma, beta = _linear(w, "delta_encoder.fusion_proj", x).chunk(2, dim=-1)
    h = _ln(w, "delta_encoder.final_ln", h_vfm * (1 + gamma) + beta, eps)
    h = _fused_attention(w, "latent_compressor.0", h, heads)
    grid = math.isqrt(h.shape[1])
    z = F.conv2d(
        h.transpose(1, 2).unflatten(2, (grid, grid)),
        w["latent_compressor.1.weight"],
        w["latent_compressor.1.bias"],
        padding=1,
    )
    return z * torch.rsqrt(z.square().mean(dim=1, keepdim=True) + 1e-6)


def pae_decode(
    w: Weights, z: torch.Tensor, heads: int, dec_heads: int, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Deprojector → ViT-MAE decoder (separate q/k/v, LN eps 1e-12) → unpatchify → de-normalise."""
    h = F.conv2d(z, w["latent_decompressor.0.weight"], w["latent_decompressor.0.bias"], padding=1)
    h = _fused_attention(w, "latent_decompressor.1", h.flatten(2).transpose(1, 2), heads)
    x = _linear(w, "decoder.decoder_embed", h)
    x = torch.cat([w["decoder.trainable_cls_token"].expand(x.shape[0], -1, -1), x], dim=1)
    x = x + w["decoder.decoder_pos_embed"]
    depth = len({k.split(".")[2] for k in w if k.startswith("decoder.decoder_layers.")})
    for i in range(depth):
        p = f"decoder.decoder_layers.{i}"
        y = _ln(w, f"{p}.layernorm_before", x, 1e-12)
        q, k, v = (_linear(w, f"{p}.attention.attention.{n}", y) for n in ("query", "key", "value"))
        x = x + _linear(w, f"{p}.attention.output.dense", _attend(q, k, v, dec_heads))
        y = F.gelu(_linear(w, f"{p}.intermediate.dense", _ln(w, f"{p}.layernorm_after", x, 1e-12)))
        x = x + _linear(w, f"{p}.output.dense", y)
    out = _linear(w, "decoder.decoder_pred", _ln(w, "decoder.decoder_norm", x, 1e-12))[:, 1:]
    grid, patch = math.isqrt(out.shape[1]), math.isqrt(out.shape[-1] // 3)
    img = (
        out.reshape(-1, grid, grid, patch, patch, 3)
        .permute(0, 5, 1, 3, 2, 4)
        .reshape(-1, 3, grid * patch, grid * patch)
    )
    return img * std + mean


def _rms(w: Weights, name: str, x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * w[f"{name}.weight"]


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos + rotated * sin


def dit_forward(w: Weights, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, heads: int) -> torch.Tensor:
    """LightningDiT: SwiGLU, RMSNorm, RoPE + absolute positions, adaLN-Zero; velocity out."""
    b, c, side, _ = x.shape
    h = F.conv2d(x, w["x_embedder.proj.weight"], w["x_embedder.proj.bias"]).flatten(2).transpose(1, 2)
    h = h + w["pos_embed"]
    half = w["t_embedder.mlp.0.weight"].shape[1] // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None] * freqs[None]
    temb = _linear(
        w, "t_embedder.mlp.2", F.silu(_linear(w, "t_embedder.mlp.0", torch.cat([args.cos(), args.sin()], -1)))
    )
    cond = temb + w["y_embedder.embedding_table.weight"][y]
    cos, sin = w["feat_rope.freqs_cos"], w["feat_rope.freqs_sin"]
    depth = len({k.split(".")[1] for k in w if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}"
        mods = _linear(w, f"{p}.adaLN_modulation.1", F.silu(cond))[:, None].chunk(6, dim=-1)
        a = _rms(w, f"{p}.norm1", h) * (1 + mods[1]) + mods[0]
        q, k, v = (_heads(part, heads) for part in _linear(w, f"{p}.attn.qkv", a).chunk(3, dim=-1))
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        att = ((q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])).softmax(-1) @ v
        h = h + mods[2] * _linear(w, f"{p}.attn.proj", att.transpose(1, 2).flatten(2))
        m = _rms(w, f"{p}.norm2", h) * (1 + mods[4]) + mods[3]
        gate, value = _linear(w, f"{p}.mlp.w12", m).chunk(2, dim=-1)
        h = h + mods[5] * _linear(w, f"{p}.mlp.w3", F.silu(gate) * value)
    shift, scale = _linear(w, "final_layer.adaLN_modulation.1", F.silu(cond))[:, None].chunk(2, dim=-1)
    out = _linear(w, "final_layer.linear", _rms(w, "final_layer.norm_final", h) * (1 + scale) + shift)
    return out.transpose(1, 2).reshape(b, c, side, side)
