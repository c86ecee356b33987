"""twinfer.parties."""
