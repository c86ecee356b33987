"""Where twinfer keeps what it makes: trained demo models, Ray's temp dir, results."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """TWINFER_CACHE, else .cache in the source checkout, else ~/.cache/twinfer."""
    env = os.environ.get("TWINFER_CACHE")
    if env:
        path = Path(env)
    else:
        checkout = Path(__file__).resolve().parents[2]
        path = checkout / ".cache" if (checkout / "pyproject.toml").exists() else Path.home() / ".cache" / "twinfer"
    path.mkdir(parents=True, exist_ok=True)
    return path
