"""twinfer.optimizer."""
