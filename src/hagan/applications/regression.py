"""Ridge regression and k-fold R^2 in numpy/scipy, so the applications need no scikit-learn.

The estimator minimises ||y - b - X w||^2 + alpha ||w||^2 with an unpenalised intercept b, the
objective of scikit-learn's ``Ridge``. Latent codes usually have more dimensions than there are
subjects, so the solve runs in whichever of the primal (p x p) or dual (n x n) form is smaller;
both give the same w.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

from hagan.errors import HaganError


@dataclass
class Standardiser:
    """Feature-wise z-scores with the training fold's mean and standard deviation.

    Constant features get a scale of 1, so they stay at 0 instead of dividing by zero.
    """

    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardiser":
        scale = x.std(axis=0)
        return cls(x.mean(axis=0), np.where(scale > 1e-12, scale, 1.0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.scale


@dataclass
class RidgeModel:
    weights: np.ndarray
    intercept: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weights + self.intercept


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> RidgeModel:
    """Ridge regression of ``y`` (n,) on ``x`` (n, p), float64; ``alpha`` >= 0 (0: minimum-norm least squares)."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if x.ndim != 2 or y.shape != (len(x),):
        raise HaganError(f"ridge regression needs x (n, p) and y (n,), got {x.shape} and {y.shape}")
    if alpha < 0:
        raise HaganError(f"ridge alpha must not be negative, got {alpha}")
    x_mean, y_mean = x.mean(axis=0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    n, p = xc.shape
    if alpha == 0:
        weights = np.linalg.lstsq(xc, yc, rcond=None)[0]
    elif p <= n:
        weights = scipy.linalg.solve(xc.T @ xc + alpha * np.eye(p), xc.T @ yc, assume_a="pos")
    else:
        weights = xc.T @ scipy.linalg.solve(xc @ xc.T + alpha * np.eye(n), yc, assume_a="pos")
    return RidgeModel(weights, float(y_mean - x_mean @ weights))


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination against the mean of ``y_true``: 0 for predicting that mean, negative if worse."""
    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    total = float(((y_true - y_true.mean()) ** 2).sum())
    if total == 0:
        raise HaganError("R^2 is undefined for a constant target")
    return 1.0 - float(((y_true - y_pred) ** 2).sum()) / total


def kfold_indices(n: int, k: int, seed: int) -> list[np.ndarray]:
    """``k`` disjoint test folds covering 0..n-1 in a seeded random order."""
    if not 2 <= k <= n:
        raise HaganError(f"k-fold needs 2 <= k <= number of subjects ({n}), got k={k}")
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


def out_of_fold_predictions(
    x: np.ndarray | None, y: np.ndarray, folds: list[np.ndarray], alpha: float | None
) -> np.ndarray:
    """Each subject predicted by the model fitted on the other folds; ``x=None`` predicts the training mean.

    ``alpha=None`` chooses the penalty inside each training fold by leave-one-out (nested, so the
    held-out fold never influences it): with fewer subjects than features a fixed tiny penalty overfits.
    """
    predictions = np.empty(len(y), np.float64)
    for test in folds:
        train = np.setdiff1d(np.arange(len(y)), test)
        if x is None:
            predictions[test] = y[train].mean()
            continue
        scaler = Standardiser.fit(x[train])
        fold_alpha = loo_alpha(scaler(x[train]), y[train])[0] if alpha is None else alpha
        model = fit_ridge(scaler(x[train]), y[train], fold_alpha)
        predictions[test] = model.predict(scaler(x[test]))
    return predictions


def cross_validated_r2(
    x: np.ndarray | None, y: np.ndarray, k: int, seeds: list[int], alpha: float | None
) -> dict[str, object]:
    """R^2 of held-out predictions over repeated k-fold splits.

    ``pooled`` is the R^2 of all out-of-fold predictions of one repetition (one value per seed);
    ``per_fold`` the R^2 inside each test fold (seed by seed, fold by fold; NaN where a fold's target
    is constant), which is noisier with small folds. The same folds serve every feature set, so
    comparisons between them are paired.
    """
    y = np.asarray(y, np.float64)
    pooled, per_fold = [], []
    for seed in seeds:
        folds = kfold_indices(len(y), k, seed)
        predictions = out_of_fold_predictions(x, y, folds, alpha)
        pooled.append(r2_score(y, predictions))
        per_fold += [r2_score(y[f], predictions[f]) if np.ptp(y[f]) > 0 else float("nan") for f in folds]
    return {
        "pooled": pooled,
        "pooled_mean": float(np.mean(pooled)),
        "pooled_std": float(np.std(pooled, ddof=1)) if len(pooled) > 1 else 0.0,
        "per_fold": per_fold,
        "per_fold_mean": float(np.nanmean(per_fold)),
        "per_fold_std": float(np.nanstd(per_fold, ddof=1)) if np.isfinite(per_fold).sum() > 1 else 0.0,
    }


ALPHA_GRID = tuple(float(a) for a in np.logspace(-4, 4, 17))


def loo_alpha(x: np.ndarray, y: np.ndarray, alphas: tuple[float, ...] = ALPHA_GRID) -> tuple[float, list[float]]:
    """The ridge penalty with the smallest leave-one-out squared error, and the error of each candidate.

    Closed form from one eigendecomposition of the centred Gram matrix: with hat matrix
    H = K (K + alpha I)^-1 + 1/n, the leave-one-out residual of subject i is r_i / (1 - H_ii).
    """
    x = np.asarray(x, np.float64) - np.mean(x, axis=0)
    y = np.asarray(y, np.float64) - np.mean(y)
    eigenvalues, vectors = np.linalg.eigh(x @ x.T)
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    projected = vectors.T @ y
    errors = []
    for alpha in alphas:
        shrink = eigenvalues / (eigenvalues + alpha)
        residual = y - vectors @ (shrink * projected)
        leverage = (vectors**2) @ shrink + 1.0 / len(y)
        errors.append(float(np.mean((residual / np.clip(1.0 - leverage, 1e-12, None)) ** 2)))
    return alphas[int(np.argmin(errors))], errors
