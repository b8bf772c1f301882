"""Training: data splits, per-step logic and checkpoints (no Ray in here)."""
