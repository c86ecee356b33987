"""A standing private-inference service: `twinfer serve`, `twinfer dealer`, and its Client."""
