"""Running stage one or two past one process: Ray Data extraction, torchrun training (optional extras)."""
