"""A 2D embedding figure of feature sets, like HA-GAN's Fig. 4 (MDS of real and generated features).

All sets are embedded together by metric MDS on Euclidean feature distances: scikit-learn's
``MDS(n_components=2)`` (SMACOF, what the HA-GAN notebook used) when scikit-learn is installed, otherwise
classical (Torgerson) MDS in numpy. Each set gets one ellipse: the covariance ellipse of its embedded
points (centre at their mean, axes along the eigenvectors of their covariance, half-axes 2 standard
deviations), i.e. the least-squares Gaussian fit, not an algebraic conic fit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from hagan.data.io import atomic_write
from hagan.errors import HaganError


def classical_mds(features: np.ndarray, n_components: int = 2) -> np.ndarray:
    """Torgerson MDS: top eigenvectors of the double-centred squared-distance matrix; signs fixed."""
    x = np.asarray(features, dtype=np.float64)
    sq = np.maximum((x**2).sum(1)[:, None] + (x**2).sum(1)[None, :] - 2 * x @ x.T, 0.0)
    n = len(x)
    j = np.eye(n) - np.ones((n, n)) / n
    b = -0.5 * j @ sq @ j
    values, vectors = np.linalg.eigh(b)
    order = np.argsort(values)[::-1][:n_components]
    coords = vectors[:, order] * np.sqrt(np.maximum(values[order], 0.0))
    signs = np.sign(coords[np.argmax(np.abs(coords), axis=0), range(coords.shape[1])])
    return coords * np.where(signs == 0, 1.0, signs)


def embed(features: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """(n, dim) -> (n, 2) coordinates and the method used ("sklearn-mds" or "classical-mds")."""
    if method not in ("auto", "sklearn", "classical"):
        raise HaganError(f"embedding method must be auto, sklearn or classical, got {method!r}")
    if method in ("auto", "sklearn"):
        try:
            from sklearn.manifold import MDS
        except ImportError:
            if method == "sklearn":
                raise HaganError("scikit-learn is not installed; use method='classical'") from None
        else:
            mds = MDS(n_components=2, random_state=seed, dissimilarity="euclidean", n_init=4)
            return mds.fit_transform(np.asarray(features, dtype=np.float64)), "sklearn-mds"
    return classical_mds(features), "classical-mds"


def covariance_ellipse(points: np.ndarray, n_std: float = 2.0) -> tuple[np.ndarray, float, float, float]:
    """(centre, width, height, angle in degrees) of the ``n_std`` covariance ellipse of 2D points."""
    p = np.asarray(points, dtype=np.float64)
    centre = p.mean(0)
    if len(p) < 3:
        return centre, 0.0, 0.0, 0.0
    values, vectors = np.linalg.eigh(np.cov(p, rowvar=False))
    values = np.maximum(values, 0.0)
    angle = float(np.degrees(np.arctan2(vectors[1, 1], vectors[0, 1])))
    return centre, float(2 * n_std * np.sqrt(values[1])), float(2 * n_std * np.sqrt(values[0])), angle


def embedding_figure(
    feature_sets: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    title: str = "",
    method: str = "auto",
    seed: int = 0,
) -> dict:
    """Embed several named feature sets (e.g. {"real": ..., "HA-GAN": ..., "WGAN": ...}) and write a PNG.

    Returns {"method": ..., "coords": {name: (n, 2) array}}. The PNG is written atomically.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse

    names = [k for k, v in feature_sets.items() if len(v)]
    if not names:
        raise HaganError("embedding figure: no features to embed")
    arrays = [np.asarray(feature_sets[k], dtype=np.float64).reshape(len(feature_sets[k]), -1) for k in names]
    dims = {a.shape[1] for a in arrays}
    if len(dims) != 1:
        raise HaganError(f"embedding figure: feature sets have different dimensions {sorted(dims)}")
    coords, used = embed(np.concatenate(arrays), method, seed)
    splits = np.cumsum([len(a) for a in arrays])[:-1]
    parts = dict(zip(names, np.split(coords, splits)))

    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    colours = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        pts = parts[name]
        colour = colours(i % 10)
        ax.scatter(pts[:, 0], pts[:, 1], s=12, alpha=0.7, color=colour, label=f"{name} (n={len(pts)})")
        centre, width, height, angle = covariance_ellipse(pts)
        if width > 0:
            ax.add_patch(Ellipse(centre, width, height, angle=angle, fill=False, color=colour, lw=1.5))
    ax.set_xlabel("MDS 1")
    ax.set_ylabel("MDS 2")
    ax.set_title(title or f"feature embedding ({used})", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return {"method": used, "coords": parts}
