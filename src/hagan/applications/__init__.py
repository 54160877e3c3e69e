"""The applications of HA-GAN's paper (section IV-C to IV-E) as reproducible experiments.

* :func:`run_augmentation`: GAN-augmented training of a 3D CNN classifier (Table V);
* :func:`run_features`: ridge regression of clinical measurements on encoded latents (Table VI);
* :func:`run_latent_walk`: a walk along a measurement's latent direction, segmented (Fig. 5).

Each works with any model's run through :func:`hagan.api.load_run` and writes results.json and a
figure; ``hagan experiment NAME`` runs them from the command line (docs/experiments.md).
"""

from hagan.applications.augmentation import AugmentationSettings, run_augmentation
from hagan.applications.classifier import Table8CNN, TrainingRecipe
from hagan.applications.features import FeatureSettings, run_features
from hagan.applications.latent_walk import WalkSettings, run_latent_walk

__all__ = [
    "AugmentationSettings", "FeatureSettings", "Table8CNN", "TrainingRecipe", "WalkSettings",
    "run_augmentation", "run_features", "run_latent_walk",
]
