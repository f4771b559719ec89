"""LightningDiT: published sizes, adaLN-Zero init, RoPE geometry, label dropout, layout and ONNX export."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from model.lightningdit import DiTConfig, LightningDiT, apply_rope, dit_config, rope_tables


def _perturbed(cfg: DiTConfig, seed: int = 0) -> LightningDiT:
    """A model whose zero-initialised layers are made non-zero, so its output depends on every input."""
    torch.manual_seed(seed)
    model = LightningDiT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _small(**overrides: object) -> DiTConfig:
    fields = {"hidden": 64, "depth": 2, "heads": 2}
    fields.update(overrides)
    return dit_config("tiny", 4, 4, 10, **fields)


@pytest.mark.parametrize(("size", "expected"), [("XL/1", 675.0e6), ("B/1", 130.4e6), ("1p0B/1", 1.03e9)])
def test_published_sizes_have_published_parameter_counts(size: str, expected: float) -> None:
    with torch.device("meta"):
        model = LightningDiT(dit_config(size, in_channels=32, grid=16, num_classes=1000))
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) / expected < 0.01, f"{size}: {count / 1e6:.2f} M"


def test_xl_block_widths_match_the_spec() -> None:
    with torch.device("meta"):
        model = LightningDiT(dit_config("XL/1", 32, 16, 1000))
    block = model.blocks[0]
    assert tuple(block.mlp.w12.weight.shape) == (6144, 1152)
    assert tuple(block.mlp.w3.weight.shape) == (1152, 3072)
    assert tuple(block.adaLN[-1].weight.shape) == (6 * 1152, 1152)
    assert tuple(model.y_embedder.weight.shape) == (1001, 1152)
    assert tuple(model.final_layer.linear.weight.shape) == (32, 1152)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="unknown LightningDiT size"):
        dit_config("XXL/1", 32, 16, 1000)
    with pytest.raises(ValueError, match="unknown DiTConfig override"):
        dit_config("tiny", 32, 16, 1000, widht=3)
    with pytest.raises(ValueError, match="head dim divisible by 4"):
        dit_config("tiny", 32, 16, 1000, hidden=60, heads=2)
    with pytest.raises(ValueError, match="divisible by heads"):
        dit_config("tiny", 32, 16, 1000, heads=5)
    with pytest.raises(ValueError, match="class_dropout"):
        dit_config("tiny", 32, 16, 1000, class_dropout=1.0)
    with pytest.raises(ValueError, match="in_channels"):
        dit_config("tiny", 0, 16, 1000)


def test_adaln_zero_output_is_exactly_zero_at_init() -> None:
    torch.manual_seed(0)
    model = LightningDiT(_small(use_qknorm=True)).eval()
    v = model(torch.randn(3, 4, 4, 4), torch.rand(3), torch.tensor([0, 5, 10]))
    assert v.shape == (3, 4, 4, 4)
    assert torch.equal(v, torch.zeros_like(v))


def test_forward_rejects_bad_inputs() -> None:
    model = LightningDiT(_small()).eval()
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(2, 3, 4, 4), t, y)
    with pytest.raises(ValueError, match="t must be"):
        model(x, t.reshape(2, 1), y)
    with pytest.raises(ValueError, match="y must be"):
        model(x, t, y.float())


def test_rope_preserves_norms_and_sees_only_relative_position() -> None:
    head_dim, grid = 16, 6
    cos, sin = rope_tables(head_dim, grid)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=gen), torch.randn(head_dim, generator=gen)

    def rot(vec: torch.Tensor, h: int, w: int) -> torch.Tensor:
        i = h * grid + w
        return apply_rope(vec, cos[i], sin[i])

    for h, w in [(0, 0), (2, 5), (5, 3)]:
        torch.testing.assert_close(rot(q, h, w).norm(), q.norm(), rtol=1e-6, atol=0)
    base = rot(q, 1, 2) @ rot(k, 3, 0)
    for dh, dw in [(1, 1), (2, 3), (-1, 0)]:
        torch.testing.assert_close(
            rot(q, 1 + dh, 2 + dw) @ rot(k, 3 + dh, 0 + dw), base, rtol=1e-5, atol=1e-5
        )
    # A different relative offset must change the score, or the test above proves nothing.
    assert abs(float(rot(q, 1, 2) @ rot(k, 3, 1)) - float(base)) > 1e-3


def test_rope_layout_is_eva_interleaved_rows_then_columns() -> None:
    head_dim, grid = 16, 5
    cos, _ = rope_tables(head_dim, grid)
    axis = head_dim // 2
    freqs = [1.0 / 10000 ** (2 * j / axis) for j in range(axis // 2)]
    h, w = 3, 4
    row = cos[h * grid + w]
    for j, f in enumerate(freqs):
        assert row[2 * j] == pytest.approx(math.cos(h * f), abs=1e-6)
        assert row[2 * j + 1] == pytest.approx(math.cos(h * f), abs=1e-6)
        assert row[axis + 2 * j] == pytest.approx(math.cos(w * f), abs=1e-6)


def test_unpatchify_places_each_patch_pixel_and_channel() -> None:
    cfg = dit_config("tiny", 3, 2, 10, hidden=32, depth=1, heads=2, patch_size=2)
    model = LightningDiT(cfg).eval()
    p, c = cfg.patch_size, cfg.in_channels
    with torch.no_grad():
        model.final_layer.linear.bias.copy_(torch.arange(p * p * c, dtype=torch.float32))
    out = model(torch.randn(1, c, 4, 4), torch.rand(1), torch.tensor([0]))
    for ch in range(c):
        for i in range(p):
            for j in range(p):
                expected = float((i * p + j) * c + ch)
                assert torch.all(out[0, ch, i::p, j::p] == expected)


def test_label_dropout_uses_the_null_class() -> None:
    model = _perturbed(_small())
    x, t = torch.randn(4, 4, 4, 4), torch.rand(4)
    y = torch.tensor([1, 2, 3, 4])
    drop = torch.tensor([True, False, True, False])
    dropped = model(x, t, y, force_drop=drop)
    torch.testing.assert_close(dropped, model(x, t, torch.tensor([10, 2, 10, 4])))
    assert not torch.allclose(dropped[0], model(x, t, y)[0])
    model.train()
    torch.manual_seed(0)
    labels = model.drop_labels(torch.zeros(20000, dtype=torch.long))
    assert abs(float((labels == 10).float().mean()) - 0.1) < 0.01  # binomial sd 0.002
    model.eval()
    assert torch.equal(model.drop_labels(y), y)


@pytest.mark.parametrize(
    "overrides",
    [
        {"use_swiglu": False},
        {"use_rmsnorm": False},
        {"use_rope": False},
        {"use_abs_pos": False},
        {"use_qknorm": True},
    ],
)
def test_every_option_changes_the_network_and_runs(overrides: dict[str, bool]) -> None:
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([0, 3])
    base, variant = _perturbed(_small()), _perturbed(_small(**overrides))
    v = variant(x, t, y)
    assert v.shape == x.shape and torch.isfinite(v).all()
    assert not torch.allclose(v, base(x, t, y), atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([0, 3])
    keep = torch.zeros(2, dtype=torch.bool)
    grads = []
    for ckpt in (False, True):
        model = _perturbed(_small()).train()
        model.grad_checkpointing = ckpt
        model(x, t, y, force_drop=keep).square().mean().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_dynamic_batch_onnx_export_matches_torch(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = _perturbed(_small(use_qknorm=True))
    batch = torch.export.Dim("batch", min=1, max=64)
    args = (torch.randn(2, 4, 4, 4), torch.rand(2), torch.tensor([1, 10]))
    program = torch.onnx.export(
        model,
        args,
        dynamo=True,
        dynamic_shapes={"x": {0: batch}, "t": {0: batch}, "y": {0: batch}},
        input_names=["x", "t", "y"],
        output_names=["v"],
        verbose=False,
    )
    path = tmp_path / "dit.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    for b in (1, 3):
        x, t = torch.randn(b, 4, 4, 4, generator=gen), torch.rand(b, generator=gen)
        y = torch.randint(0, 11, (b,), generator=gen)
        with torch.no_grad():
            ref = model(x, t, y).numpy()
        out = session.run(None, {"x": x.numpy(), "t": t.numpy(), "y": y.numpy()})[0]
        assert out.shape == ref.shape
        assert np.abs(ref).max() > 0.1
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
