"""twinfer.deploy."""
