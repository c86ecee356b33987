"""Configuration: party config files, where twinfer keeps its files, TLS certificates."""
