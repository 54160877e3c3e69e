"""The 3D baselines of HA-GAN's paper: WGAN-GP, alpha-GAN and VAE-GAN (Kwon et al., MICCAI 2019)."""
