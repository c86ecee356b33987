"""AutoReP: learned per-element ReLU masks with DaPa polynomials elsewhere."""
