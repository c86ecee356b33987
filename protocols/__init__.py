"""twinfer.protocols."""
