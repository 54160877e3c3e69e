"""Training: the trainer loop, checkpoints, data parallelism, precision and device placement, and the losses the models share."""
