"""HA-GAN (Sun et al., IEEE JBHI 2022): its networks, training step, tiled inference and the import of the authors' weights."""
