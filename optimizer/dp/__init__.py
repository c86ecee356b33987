"""Sparsity-preserving DP training of embedding models (DP-FEST / DP-AdaFEST) and its privacy accounting."""
