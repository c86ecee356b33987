"""twinfer: two-party private neural-network inference. `from twinfer import Client` reaches a standing server.

This folder is the `twinfer` package itself; its sub-packages (twinfer.parties, twinfer.protocols,
twinfer.optimizer, twinfer.deploy, twinfer.benchmarks) are the repository's top-level folders,
mapped in pyproject.toml. Names load on first use, so that `import twinfer.protocols...` does not
pull in gRPC.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Client"]

if TYPE_CHECKING:
    from twinfer.deploy.serve.client import Client


def __getattr__(name: str) -> Any:
    if name == "Client":
        from twinfer.deploy.serve.client import Client

        return Client
    raise AttributeError(f"module 'twinfer' has no attribute '{name}'")
