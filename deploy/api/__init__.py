"""twinfer: two-party private neural-network inference.

    import twinfer
    result = twinfer.infer("model.onnx", images)                      # three local processes over gRPC
    twinfer.optimize("model.onnx", "fashion-mnist", "art/", relu_budget=5000)   # an artifact to serve
    with twinfer.Client("S:7700", dealer="D:7702", tls="certs/") as c:          # a standing server
        logits = c.infer(images)

This folder is the `twinfer` package itself; its sub-packages (twinfer.parties, twinfer.protocols,
twinfer.optimizer, twinfer.deploy, twinfer.benchmarks) are the repository's top-level folders,
mapped in pyproject.toml. Names load on first use, so that `import twinfer.protocols...` does not
pull in gRPC.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = ["Client", "SessionSpec", "infer", "optimize"]

_HOMES = {
    "Client": "twinfer.deploy.serve.client",
    "SessionSpec": "twinfer.parties.runtime.session_spec",
    "infer": "twinfer.deploy.launch.inference",
    "optimize": "twinfer.deploy.cli.cmd_optimize",
}

if TYPE_CHECKING:
    from twinfer.deploy.cli.cmd_optimize import optimize
    from twinfer.deploy.launch.inference import infer
    from twinfer.deploy.serve.client import Client
    from twinfer.parties.runtime.session_spec import SessionSpec


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'twinfer' has no attribute '{name}'")
