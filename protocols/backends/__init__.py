"""Protocol backends behind one interface (`base.Backend`); a session picks one by name."""

from __future__ import annotations

from .base import Backend, CorrelationKind, Cost, Pricing
from .crypten.backend import CryptenBackend
from .crypten.pricing import CryptenPricing
from .fss.backend import FssBackend, FssCompactBackend

# measured by benchmarks/fss_targets.py: no slower than crypten on loopback for the demo models and
# the LeNet-5, 6-9x faster under wan (fss, one round per comparison, a little faster still there)
DEFAULT_PROTOCOL = "fss-compact"
_BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (CryptenBackend, FssBackend, FssCompactBackend)}


def protocols() -> tuple[str, ...]:
    """Names a user may pass as --protocol."""
    return tuple(_BACKENDS)


def backend_class(protocol: str) -> type[Backend]:
    try:
        return _BACKENDS[protocol]
    except KeyError:
        raise ValueError(f"unknown protocol '{protocol}' (known: {', '.join(_BACKENDS)})") from None


def pricing_for(protocol: str) -> Pricing:
    return backend_class(protocol).pricing


def correlation_kind(name: str) -> CorrelationKind:
    """The correlation kind `name` of whichever backend needs it (the dealer's registry)."""
    for backend in _BACKENDS.values():
        for kind in backend.correlations:
            if kind.name == name:
                return kind
    known = [k.name for b in _BACKENDS.values() for k in b.correlations]
    raise ValueError(f"unknown tuple function '{name}' (known: {', '.join(known)})")


__all__ = ["Backend", "CorrelationKind", "Cost", "CryptenPricing", "DEFAULT_PROTOCOL", "Pricing", "backend_class", "correlation_kind", "pricing_for", "protocols"]
