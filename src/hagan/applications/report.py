"""What every application writes: results.json, a PNG figure, and the statistics both quote."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats
from matplotlib.figure import Figure

from hagan import __version__
from hagan.data.io import atomic_write, write_json_atomic

RESULTS_FILE = "results.json"


def save_figure(figure: Figure, path: str | os.PathLike) -> Path:
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    return Path(path)


def write_results(out: str | os.PathLike, results: dict[str, Any]) -> Path:
    return write_json_atomic(Path(out) / RESULTS_FILE, {"hagan_version": __version__, **results})


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0}


def paired_comparison(treated: list[float], control: list[float]) -> dict[str, Any]:
    """Difference of paired runs (same seeds): mean, 95% t-interval, paired t-test and, from six
    pairs on, the Wilcoxon signed-rank test, which does not assume normal differences."""
    a, b = np.asarray(treated, np.float64), np.asarray(control, np.float64)
    diff = a - b
    result: dict[str, Any] = {"pairs": len(diff), "mean_difference": float(diff.mean())}
    if len(diff) < 2:
        return result
    spread = diff.std(ddof=1)
    half = float(scipy.stats.t.ppf(0.975, len(diff) - 1) * spread / np.sqrt(len(diff)))
    result["ci95"] = [result["mean_difference"] - half, result["mean_difference"] + half]
    if spread > 0:
        test = scipy.stats.ttest_rel(a, b)
        result["t"], result["p_ttest"] = float(test.statistic), float(test.pvalue)
    if len(diff) >= 6 and np.any(diff != 0):
        result["p_wilcoxon"] = float(scipy.stats.wilcoxon(a, b).pvalue)
    return result


def corrected_resampled_comparison(treated: list[float], control: list[float], test_train_ratio: float) -> dict[str, Any]:
    """Difference over the folds of repeated k-fold cross-validation, paired fold by fold.

    Folds of different repetitions share subjects, so their differences are correlated and the plain
    paired t-test's variance, var / J, is far too small. Nadeau and Bengio's corrected resampled
    t-test (Machine Learning 52, 2003) uses var * (1 / J + n_test / n_train) instead.
    """
    a, b = np.asarray(treated, np.float64), np.asarray(control, np.float64)
    usable = np.isfinite(a) & np.isfinite(b)
    diff = a[usable] - b[usable]
    result: dict[str, Any] = {"folds": len(diff), "mean_difference": float(diff.mean()) if len(diff) else float("nan"),
                              "test": "corrected resampled t-test (Nadeau and Bengio 2003)"}
    if len(diff) < 2:
        return result
    error = float(np.sqrt(diff.var(ddof=1) * (1 / len(diff) + test_train_ratio)))
    half = float(scipy.stats.t.ppf(0.975, len(diff) - 1) * error)
    result["ci95"] = [result["mean_difference"] - half, result["mean_difference"] + half]
    if error > 0:
        result["t"] = result["mean_difference"] / error
        result["p_ttest"] = float(2 * scipy.stats.t.sf(abs(result["t"]), len(diff) - 1))
    return result
