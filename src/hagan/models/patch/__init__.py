"""The multi-scale patch-based GAN (Uzunova et al. 2019, 2020): networks, sketches, stitching and translation."""
