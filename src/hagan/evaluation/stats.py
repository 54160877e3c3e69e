"""Distribution distances on features (float64 numpy/scipy), 3D MS-SSIM (torch) and the paper's t-test.

* ``frechet_distance``: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), scipy.linalg.sqrtm; if the
  product is singular (non-finite square root) eps * I is added to both covariances, as in the
  reference FID code.
* ``kid``: unbiased MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over
  random subsets (mean and standard deviation), subset size min(1000, n_real, n_fake).
* ``mmd``: unbiased MMD^2 with the Gaussian kernel exp(-||x - y||^2 / m^2), m the median of all pairwise
  distances of the pooled sample (HA-GAN's torch_two_sample ``alphas='median'``).
* ``ms_ssim_3d``: multi-scale SSIM of two volumes with a Gaussian window (see its docstring).
* ``one_tailed_ttest``: Welch or Student two-sample t-test, one-tailed.

MONAI's FIDMetric, MMDMetric and MultiScaleSSIMMetric are checked against these in tests/test_monai.py.
These stay because HA-GAN's published numbers use a Gaussian-kernel MMD (MONAI's is linear) and an MS-SSIM
window that 64^3 volumes fit, and so that evaluating needs no MONAI (docs/metrics.md).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.stats
import torch
import torch.nn.functional as F
from torch import Tensor

from hagan.errors import HaganError

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
MS_SSIM_KERNEL = 7
MS_SSIM_SIGMA = 1.5
MS_SSIM_K = (0.01, 0.03)
DATA_RANGE = 2.0  # volumes in [-1, 1]
FID_METHODS = ("sqrtm", "eigh")


def _as_2d(features, name: str) -> np.ndarray:
    x = np.asarray(features.numpy() if isinstance(features, Tensor) else features, dtype=np.float64)
    if x.ndim != 2:
        raise HaganError(f"{name}: features must be (n, dim), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise HaganError(f"{name}: features contain NaN or infinity")
    return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (float64, ddof=1) of (n, dim) features."""
    x = _as_2d(features, "features")
    if len(x) < 2:
        raise HaganError(f"need at least 2 samples for a covariance, got {len(x)}")
    return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((S1 S2)^(1/2)) for symmetric PSD S1, S2: the eigenvalues of S1^(1/2) S2 S1^(1/2) are those of S1 S2."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root @ sigma2 @ root)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Fréchet distance between two Gaussians, float64.

    ``method="sqrtm"`` (default) is the reference FID computation (scipy.linalg.sqrtm of S1 S2, eps * I
    added to both covariances when the root is not finite, a negligible imaginary part dropped);
    ``method="eigh"`` gives the same value from two symmetric eigendecompositions, much faster for
    2048-d features and free of complex round-off.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise HaganError(f"mean/covariance shapes differ: {mu1.shape} {sigma1.shape} vs {mu2.shape} {sigma2.shape}")
    if method not in FID_METHODS:
        raise HaganError(f"Fréchet distance method must be one of {', '.join(FID_METHODS)}, got {method!r}")
    diff = mu1 - mu2
    if method == "eigh":
        trace_root = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on singular products; handled below
            covmean = np.asarray(scipy.linalg.sqrtm(sigma1 @ sigma2))
        if not np.all(np.isfinite(covmean)):
            offset = np.eye(len(mu1)) * eps
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                covmean = np.asarray(scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset)))
        if np.iscomplexobj(covmean):
            imag = np.abs(np.diagonal(covmean).imag).max()
            if imag > 1e-3 * max(1.0, abs(np.trace(covmean).real)):
                raise HaganError(f"Fréchet distance: square root has a large imaginary component ({imag:.3g})")
            covmean = covmean.real
        trace_root = float(np.trace(covmean))
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)
    return max(value, 0.0)


def fid_from_features(real, fake, method: str = "sqrtm") -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (covariances with ddof=1).

    With ``method="eigh"`` the cross term is computed from the centred features A (n1 x d) and B
    (n2 x d) directly: the nonzero eigenvalues of S1 S2 are the squared singular values of A B^T /
    sqrt((n1-1)(n2-1)), so tr((S1 S2)^(1/2)) is that matrix's nuclear norm; exact, and cheap when
    n < d (the usual case for 3D sets).
    """
    if method != "eigh":
        return frechet_distance(*feature_statistics(real), *feature_statistics(fake), method=method)
    x, y = _as_2d(real, "real features"), _as_2d(fake, "fake features")
    if len(x) < 2 or len(y) < 2:
        raise HaganError(f"need at least 2 samples per set for a covariance, got {len(x)} and {len(y)}")
    if x.shape[1] != y.shape[1]:
        raise HaganError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    a, b = x - x.mean(0), y - y.mean(0)
    c1, c2 = len(x) - 1, len(y) - 1
    trace_root = float(np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(c1 * c2))
    diff = x.mean(0) - y.mean(0)
    value = float(diff @ diff + (a**2).sum() / c1 + (b**2).sum() / c2 - 2 * trace_root)
    return max(value, 0.0)


def _polynomial_mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = len(x), len(y)
    sum_xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    sum_yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sum_xx + sum_yy - 2 * kxy.mean())


def kid(real, fake, n_subsets: int = 100, subset_size: int | None = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (unbiased): mean and standard deviation over ``n_subsets`` subsets.

    Each subset draws min(subset_size, n_real, n_fake) samples without replacement from each set.
    """
    x, y = _as_2d(real, "real features"), _as_2d(fake, "fake features")
    size = min(len(x), len(y), subset_size or len(x))
    if size < 2:
        raise HaganError(f"KID needs at least 2 samples in each set, got {len(x)} and {len(y)}")
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            _polynomial_mmd2_unbiased(x[rng.choice(len(x), size, replace=False)], y[rng.choice(len(y), size, replace=False)])
            for _ in range(n_subsets)
        ]
    )
    return float(values.mean()), float(values.std())


def mmd(real, fake) -> float:
    """Unbiased MMD^2, Gaussian kernel with the median heuristic (HA-GAN's MMD)."""
    x, y = _as_2d(real, "real features"), _as_2d(fake, "fake features")
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise HaganError(f"MMD needs at least 2 samples in each set, got {m} and {n}")
    z = np.concatenate([x, y])
    sq = np.maximum((z**2).sum(1)[:, None] + (z**2).sum(1)[None, :] - 2 * z @ z.T, 0.0)
    np.fill_diagonal(sq, 0.0)
    distances = np.sqrt(sq)
    # torch.median semantics (lower middle value) over the whole matrix, zeros on the diagonal included
    flat = np.sort(distances.ravel())
    median = flat[(flat.size - 1) // 2]
    if median <= 0:
        return 0.0
    k = np.exp(-sq / median**2)
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    value = (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()
    return float(value)


# --------------------------------------------------------------------------------------------- MS-SSIM


def _gaussian_window(size: int, sigma: float, device, dtype) -> Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: Tensor, window: Tensor) -> Tensor:
    """Separable 'valid' Gaussian filtering of (N, C, D, H, W)."""
    k = len(window)
    c = x.shape[1]
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = k
        x = F.conv3d(x, window.reshape(shape).expand(c, 1, *shape[2:]).contiguous(), groups=c)
    return x


def ms_ssim_scales(shape: tuple[int, ...], kernel_size: int = MS_SSIM_KERNEL, max_scales: int = 5) -> int:
    """Scales used for a volume: the most (up to 5) for which the coarsest scale still fits the window.

    Scale j (0-based) has size floor(s / 2^j) per axis; it must be at least ``kernel_size``.
    """
    smallest = min(shape)
    if smallest < kernel_size:
        raise HaganError(f"MS-SSIM: volume {tuple(shape)} is smaller than the {kernel_size}^3 window")
    scales = 1
    while scales < max_scales and smallest // 2**scales >= kernel_size:
        scales += 1
    return scales


def ms_ssim_3d(
    x: Tensor,
    y: Tensor,
    data_range: float = DATA_RANGE,
    kernel_size: int = MS_SSIM_KERNEL,
    sigma: float = MS_SSIM_SIGMA,
    weights: tuple[float, ...] = MS_SSIM_WEIGHTS,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """3D MS-SSIM (Wang et al. 2003) of batches (N, 1, D, H, W) -> (N,).

    Gaussian window ``kernel_size``^3 (7) with sigma 1.5, 'valid' filtering, K1 = 0.01, K2 = 0.03,
    ``data_range`` 2 for volumes in [-1, 1] (the same as data range 1 on [0, 1]); 2x average pooling
    between scales. Up to 5 scales with the standard weights; a volume too small for all 5 (the coarsest
    scale must be at least the window) uses the first M scales that fit, with their weights renormalised
    to sum to 1. Negative contrast-structure values are clipped at 0 before the weighted product.
    Filtering runs in ``dtype`` (float32; pass torch.float64 for a reference), the product in float64.
    """
    if x.shape != y.shape:
        raise HaganError(f"MS-SSIM: shapes differ {tuple(x.shape)} vs {tuple(y.shape)}")
    x, y = x.to(dtype), y.to(dtype)
    scales = ms_ssim_scales(tuple(x.shape[2:]), kernel_size, len(weights))
    w = torch.tensor(weights[:scales], dtype=torch.float64, device=x.device)
    w = w / w.sum()
    window = _gaussian_window(kernel_size, sigma, x.device, dtype)
    c1, c2 = (MS_SSIM_K[0] * data_range) ** 2, (MS_SSIM_K[1] * data_range) ** 2
    values = []
    for j in range(scales):
        mx, my = _blur(x, window), _blur(y, window)
        sxx = _blur(x * x, window) - mx**2
        syy = _blur(y * y, window) - my**2
        sxy = _blur(x * y, window) - mx * my
        cs = (2 * sxy + c2) / (sxx + syy + c2)
        if j == scales - 1:
            lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
            values.append((lum * cs).flatten(1).mean(1))
        else:
            values.append(cs.flatten(1).mean(1))
            x, y = F.avg_pool3d(x, 2), F.avg_pool3d(y, 2)
    stacked = torch.stack(values, dim=1).double().clamp_min(0)
    return torch.prod(stacked ** w[None], dim=1)


def mean_pairwise_ms_ssim(
    volumes: Tensor, max_pairs: int | None = 500, seed: int = 0, batch_size: int = 4, device: str | torch.device = "cpu"
) -> tuple[float, int]:
    """Mean MS-SSIM over pairs of distinct volumes (all pairs, or ``max_pairs`` random ones); (mean, pairs)."""
    x = torch.as_tensor(volumes, dtype=torch.float32)
    if x.dim() == 4:
        x = x[:, None]
    n = len(x)
    if n < 2:
        raise HaganError(f"MS-SSIM diversity needs at least 2 volumes, got {n}")
    pairs = list(itertools.combinations(range(n), 2))
    if max_pairs is not None and len(pairs) > max_pairs:
        rng = np.random.default_rng(seed)
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), max_pairs, replace=False))]
    total = 0.0
    for begin in range(0, len(pairs), batch_size):
        chunk = pairs[begin : begin + batch_size]
        a = torch.stack([x[i] for i, _ in chunk]).to(device)
        b = torch.stack([x[j] for _, j in chunk]).to(device)
        total += float(ms_ssim_3d(a, b).sum())
    return total / len(pairs), len(pairs)


# --------------------------------------------------------------------------------------------- t-test


@dataclass
class TTestResult:
    statistic: float
    pvalue: float
    alternative: str
    n_a: int
    n_b: int


def one_tailed_ttest(a, b, alternative: str = "less", equal_var: bool = False) -> TTestResult:
    """Two-sample one-tailed t-test between scores of two methods (e.g. FID over folds or repeats).

    ``alternative="less"`` tests whether method a's mean is lower than b's (lower FID is better).
    Welch's test (unequal variances) unless ``equal_var``.
    """
    if alternative not in ("less", "greater"):
        raise HaganError(f"alternative must be 'less' or 'greater', got {alternative!r}")
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if len(a) < 2 or len(b) < 2:
        raise HaganError(f"t-test needs at least 2 scores per method, got {len(a)} and {len(b)}")
    result = scipy.stats.ttest_ind(a, b, equal_var=equal_var, alternative=alternative)
    statistic, pvalue = float(result.statistic), float(result.pvalue)
    if math.isnan(pvalue):
        raise HaganError("t-test undefined: both methods have constant scores")
    return TTestResult(statistic, pvalue, alternative, len(a), len(b))
