"""Evaluation of generated volumes: feature extractors, FID / KID / MMD / MS-SSIM, t-test, MDS figure.

See docs/metrics.md for each metric's protocol and what it is comparable with.
"""

from hagan.evaluation.embedding import classical_mds, covariance_ellipse, embedding_figure
from hagan.evaluation.evaluate import (
    PeriodicKID,
    embedding_from_evaluations,
    evaluate,
    load_stats,
    output_to_model_range,
    write_stats,
)
from hagan.evaluation.features import (
    FEATURES,
    DeepBetExtractor,
    FeatureExtractor,
    Inception25DExtractor,
    MedicalNetExtractor,
    build_extractor,
)
from hagan.evaluation.medicalnet import KNOWN_WEIGHTS, MedicalNetResNet, load_medicalnet
from hagan.evaluation.stats import (
    feature_statistics,
    fid_from_features,
    frechet_distance,
    kid,
    mean_pairwise_ms_ssim,
    mmd,
    ms_ssim_3d,
    one_tailed_ttest,
)

__all__ = [
    "FEATURES",
    "KNOWN_WEIGHTS",
    "DeepBetExtractor",
    "FeatureExtractor",
    "Inception25DExtractor",
    "MedicalNetExtractor",
    "MedicalNetResNet",
    "PeriodicKID",
    "build_extractor",
    "classical_mds",
    "covariance_ellipse",
    "embedding_figure",
    "embedding_from_evaluations",
    "evaluate",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "kid",
    "load_medicalnet",
    "load_stats",
    "mean_pairwise_ms_ssim",
    "mmd",
    "ms_ssim_3d",
    "one_tailed_ttest",
    "output_to_model_range",
    "write_stats",
]
