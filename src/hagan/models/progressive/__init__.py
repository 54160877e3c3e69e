"""The progressive growing GAN for medical images (Beers et al. 2018): networks and growth schedule."""
