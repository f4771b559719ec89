"""Latent-geometry diagnostics defined in the PAE paper: SSC, LPC, GSQ and eRank.

They describe the latent space rather than the reconstructions: whether tokens group by object
(SSC), whether small latent moves give small perceptual changes (LPC, the one that tracks gFID best),
whether pooled latents carry class identity (GSQ), and how many directions the latents use (eRank).
The paper leaves SSC's σ and cluster count open; the choices here are documented on `ssc`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Decoder = Callable[[torch.Tensor], torch.Tensor]
PerceptualDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SSC_SIGMA = 0.1
LPC_RHOS = (0.1, 0.5, 1.0, 2.0)


def _check_latents(latents: torch.Tensor, who: str) -> None:
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"{who}: expected a torch tensor of latents, got {type(latents).__name__}")
    if latents.ndim != 4:
        raise ValueError(f"{who}: expected latents shaped B×d×h×w, got {tuple(latents.shape)}")
    if latents.shape[0] == 0:
        raise ValueError(f"{who}: empty batch of latents")
    if not torch.isfinite(latents).all():
        raise ValueError(f"{who}: latents contain NaN or inf")


def _pooled(latents: torch.Tensor, who: str) -> torch.Tensor:
    """Global-average-pool B×d×h×w latents to B×d (float64); an already pooled B×d matrix passes through."""
    if isinstance(latents, torch.Tensor) and latents.ndim == 2:
        if not torch.isfinite(latents).all():
            raise ValueError(f"{who}: features contain NaN or inf")
        return latents.detach().double()
    _check_latents(latents, who)
    return latents.detach().double().mean(dim=(2, 3))


def spectral_labels(tokens: np.ndarray, num_clusters: int, sigma: float, seed: int) -> np.ndarray:
    """Normalised spectral clustering (Ng, Jordan & Weiss) of token rows under a cosine-exp affinity.

    A_ij = exp(⟨ẑ_i, ẑ_j⟩/σ) with A_ii = 0. The exponent is shifted by −1/σ before exponentiating;
    a constant factor cancels in D^{-1/2} A D^{-1/2}, and the shift keeps small σ from overflowing.
    The top-k eigenvectors of D^{-1/2} A D^{-1/2}, row-normalised, are clustered with k-means.
    """
    from scipy.linalg import eigh
    from sklearn.cluster import KMeans

    unit = tokens / np.maximum(np.linalg.norm(tokens, axis=1, keepdims=True), 1e-12)
    affinity = np.exp((unit @ unit.T - 1.0) / sigma)
    np.fill_diagonal(affinity, 0.0)
    degree = affinity.sum(axis=1)
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1e-300))
    normalised = affinity * inv_sqrt[:, None] * inv_sqrt[None, :]
    n = normalised.shape[0]
    _, vectors = eigh((normalised + normalised.T) / 2, subset_by_index=[n - num_clusters, n - 1])
    embedding = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return KMeans(n_clusters=num_clusters, n_init=10, random_state=seed).fit_predict(embedding)


def ssc(latents: torch.Tensor, masks: torch.Tensor, sigma: float = SSC_SIGMA, seed: int = 0) -> float:
    """Spatial Structure Coherence: mean over images of NMI(spectral clusters of tokens, mask labels).

    ``masks`` is B×h×w integer labels on the latent grid. Per image, k is the number of distinct
    mask labels in that image (the paper does not fix k; matching the ground-truth count makes a
    perfect grouping score 1). σ = 0.1 (not given by the paper) makes the affinity sharply prefer
    near-parallel tokens. NMI uses the geometric-mean normaliser. Images whose mask has a single
    label carry no grouping information and are skipped; at least one image must remain.
    """
    from sklearn.metrics import normalized_mutual_info_score

    _check_latents(latents, "ssc")
    if not isinstance(masks, torch.Tensor) or masks.is_floating_point() or masks.is_complex():
        raise TypeError("ssc: masks must be an integer torch tensor shaped B×h×w")
    b, _, h, w = latents.shape
    if tuple(masks.shape) != (b, h, w):
        raise ValueError(f"ssc: masks must be {b}×{h}×{w} to match the latents, got {tuple(masks.shape)}")
    if sigma <= 0:
        raise ValueError(f"ssc: sigma must be positive, got {sigma}")
    tokens = latents.detach().double().flatten(2).transpose(1, 2).cpu().numpy()
    labels = masks.reshape(b, -1).cpu().numpy()
    scores = []
    for i in range(b):
        k = len(np.unique(labels[i]))
        if k < 2:
            continue
        predicted = spectral_labels(tokens[i], k, sigma, seed)
        scores.append(normalized_mutual_info_score(labels[i], predicted, average_method="geometric"))
    if not scores:
        raise ValueError("ssc: every mask has a single label; SSC needs at least two regions in some image")
    return float(np.mean(scores))


def foreground_masks(
    images: torch.Tensor, grid: int | tuple[int, int], threshold: float = 0.5, pixel_threshold: float = 0.05
) -> torch.Tensor:
    """Object (1) vs background (0) labels on the latent grid, for dark-background data (Fashion-MNIST).

    A pixel is object when its grey level exceeds ``pixel_threshold``; the binary map is area-averaged
    down to the grid and a cell is object when at least ``threshold`` of its area is. Returns int64
    B×h×w, the ``masks`` argument of `ssc`.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"foreground_masks: expected images shaped B×1×H×W or B×3×H×W, got {shape}")
    gh, gw = (grid, grid) if isinstance(grid, int) else tuple(grid)
    if gh <= 0 or gw <= 0 or gh > images.shape[2] or gw > images.shape[3]:
        raise ValueError(f"foreground_masks: grid {gh}×{gw} must be positive and no finer than the images")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"foreground_masks: threshold must be in (0, 1], got {threshold}")
    grey = images.detach().float().mean(dim=1, keepdim=True)
    fraction = F.adaptive_avg_pool2d((grey > pixel_threshold).float(), (gh, gw))
    return (fraction[:, 0] >= threshold).long()


def lpc_weights(rhos: Sequence[float]) -> list[float]:
    """Scale weights ∝ 1/ρ, normalised to sum 1 (for the paper's ρ: ≈ 0.741, 0.148, 0.074, 0.037)."""
    if not rhos or any(r <= 0 for r in rhos):
        raise ValueError(f"lpc: rhos must be a non-empty sequence of positive scales, got {tuple(rhos)}")
    inverse = [1.0 / r for r in rhos]
    total = sum(inverse)
    return [v / total for v in inverse]


@torch.no_grad()
def lpc(
    latents: torch.Tensor,
    decode: Decoder,
    lpips: PerceptualDistance,
    rhos: Sequence[float] = LPC_RHOS,
    generator: torch.Generator | None = None,
    batch_size: int = 64,
) -> dict[str, float | dict[str, float]]:
    """Local Perceptual Continuity: perceptual change of decodes under latent perturbations.

    For each latent z, one direction u uniform on the unit sphere of the whole latent is drawn and
    shared by every scale (common random numbers, so the scales differ only by ρ); ε = ρ‖z‖₂ and the
    score at ρ is ½[LPIPS(D(z+εu), D(z)) + LPIPS(D(z−εu), D(z))], averaged over latents. The
    perturbed latents are decoded as they are (no re-projection onto the sphere): LPC probes the
    decoder off the data manifold too. Decodes are clamped to [0, 1], the range LPIPS expects.

    ``lpips(a, b)`` returns per-image distances (B or B×1×1×1). Returns
    ``{"lpc": Σ w_ρ·LPC_ρ, "per_rho": {ρ: LPC_ρ}, "weights": {ρ: w_ρ}}`` with w ∝ 1/ρ.
    """
    _check_latents(latents, "lpc")
    weights = lpc_weights(rhos)
    if batch_size <= 0:
        raise ValueError(f"lpc: batch_size must be positive, got {batch_size}")
    sums = [0.0] * len(rhos)
    count = 0

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = lpips(a, b)
        if d.numel() != a.shape[0]:
            raise ValueError(f"lpc: lpips must return one distance per image, got shape {tuple(d.shape)}")
        return d.reshape(-1).double()

    for start in range(0, latents.shape[0], batch_size):
        z = latents[start : start + batch_size]
        noise = torch.randn(z.shape, generator=generator, dtype=torch.float32, device="cpu").to(
            z.device, z.dtype
        )
        flat_norm = noise.flatten(1).norm(dim=1).clamp_min(1e-12)
        u = noise / flat_norm.view(-1, 1, 1, 1)
        z_norm = z.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        base = decode(z).clamp(0.0, 1.0)
        for i, rho in enumerate(rhos):
            step = rho * z_norm * u
            plus = decode(z + step).clamp(0.0, 1.0)
            minus = decode(z - step).clamp(0.0, 1.0)
            sums[i] += float((0.5 * (distance(plus, base) + distance(minus, base))).sum())
        count += z.shape[0]
    per_rho = [s / count for s in sums]
    return {
        "lpc": float(sum(w * v for w, v in zip(weights, per_rho, strict=True))),
        "per_rho": {str(r): v for r, v in zip(rhos, per_rho, strict=True)},
        "weights": {str(r): w for r, w in zip(rhos, weights, strict=True)},
    }


def gsq(latents: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> float:
    """Global Semantic Quality: leave-one-out 1-NN label purity of pooled latents under cosine.

    Latents (B×d×h×w, or already pooled B×d) are global-average-pooled, centred on the set mean and
    ℓ2-normalised; each sample's nearest other sample must share its label. The paper reports it on
    random 100-class subsets, mean ± std over 5 draws — the caller draws the subsets.
    """
    feats = _pooled(latents, "gsq")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 1 or labels.shape[0] != feats.shape[0]:
        raise ValueError(f"gsq: labels must be a 1-D tensor with one label per latent ({feats.shape[0]})")
    if feats.shape[0] < 2:
        raise ValueError("gsq: need at least 2 latents for a leave-one-out nearest neighbour")
    feats = feats - feats.mean(dim=0, keepdim=True)
    feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    labels = labels.to(feats.device)
    hits = 0
    for start in range(0, feats.shape[0], chunk):
        sim = feats[start : start + chunk] @ feats.T
        rows = torch.arange(sim.shape[0], device=sim.device)
        sim[rows, rows + start] = float("-inf")
        nearest = sim.argmax(dim=1)
        hits += int((labels[nearest] == labels[start : start + chunk]).sum())
    return hits / feats.shape[0]


def erank(latents: torch.Tensor) -> float:
    """Effective rank of the pooled feature matrix (N×C) divided by C, in (0, 1].

    exp of the Shannon entropy of the singular values normalised to sum 1 (Roy & Vetterli). The matrix
    is not centred, following the paper's definition; 1/C means a single direction, 1 means all C
    directions are used equally.
    """
    feats = _pooled(latents, "erank")
    singular = torch.linalg.svdvals(feats)
    total = singular.sum()
    if total <= 0:
        raise ValueError("erank: the pooled feature matrix is all zeros")
    p = singular / total
    p = p[p > 0]
    entropy = -(p * p.log()).sum()
    return float(entropy.exp() / feats.shape[1])
