"""Network profiles for latency studies: named ones and `rtt=40ms,bw=100mbit` strings."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

from twinfer.protocols.cost_model import link_time_s


class ProfileError(ValueError):
    """A network profile that cannot be parsed or makes no sense."""


@dataclass(frozen=True)
class NetworkProfile:
    """Round-trip time and bandwidth of one link, applied per direction."""

    name: str
    rtt_s: float
    bandwidth_bps: float | None  # bits per second; None: unlimited

    def __post_init__(self) -> None:
        if self.rtt_s < 0:
            raise ProfileError(f"profile '{self.name}': rtt must not be negative, got {self.rtt_s} s")
        if self.bandwidth_bps is not None and self.bandwidth_bps <= 0:
            raise ProfileError(f"profile '{self.name}': bandwidth must be positive, got {self.bandwidth_bps} bit/s")

    @property
    def shaped(self) -> bool:
        return self.rtt_s > 0 or self.bandwidth_bps is not None

    def lower_bound_s(self, rounds: int, bytes_one_way: int) -> float:
        """No run on this link can be faster: rounds * rtt/2 + bytes of the busier direction / bandwidth.

        A CrypTen round is a simultaneous exchange (both parties send, then read what crossed),
        so it costs one one-way delay, not a round trip; and the two directions of a link
        carry their bytes at the same time. DESIGN.md's `rounds * rtt + bytes_online /
        bandwidth` counts both twice, so measured runs come in under it.
        """
        return link_time_s(rounds, bytes_one_way, self.rtt_s, self.bandwidth_bps)

    def describe(self) -> str:
        bw = "unlimited" if self.bandwidth_bps is None else f"{self.bandwidth_bps / 1e6:g} Mbit/s"
        return f"{self.name} (rtt {self.rtt_s * 1e3:g} ms, {bw})"


PROFILES = {
    "loopback": NetworkProfile("loopback", 0.0, None),
    "lan": NetworkProfile("lan", 0.0005, 1e9),
    "wan": NetworkProfile("wan", 0.040, 100e6),
    "mobile": NetworkProfile("mobile", 0.080, 20e6),
}

_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_RATE_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 1, "kbps": 1e3, "mbps": 1e6, "gbps": 1e9}


def _number(text: str, units: dict[str, float], what: str, spec: str) -> float:
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match:
        raise ProfileError(f"network profile '{spec}': cannot read {what} '{text}'")
    value, unit = float(match.group(1)), match.group(2).lower()
    if unit not in units:
        raise ProfileError(f"network profile '{spec}': unknown {what} unit '{unit or '(none)'}', use one of {', '.join(units)}")
    return value * units[unit]


def parse_profile(spec: str) -> NetworkProfile:
    """A named profile (loopback, lan, wan, mobile) or 'rtt=40ms,bw=100mbit' (either part optional)."""
    spec = spec.strip()
    if spec in PROFILES:
        return PROFILES[spec]
    if "=" not in spec:
        raise ProfileError(f"unknown network profile '{spec}': use one of {', '.join(PROFILES)} or 'rtt=40ms,bw=100mbit'")
    fields: dict[str, str] = {}
    for part in spec.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("rtt", "bw"):
            raise ProfileError(f"network profile '{spec}': expected rtt=... and/or bw=..., got '{part}'")
        if key in fields:
            raise ProfileError(f"network profile '{spec}': '{key}' given twice")
        fields[key] = value
    rtt = _number(fields["rtt"], _TIME_UNITS, "rtt", spec) if "rtt" in fields else 0.0
    bw = _number(fields["bw"], _RATE_UNITS, "bandwidth", spec) if "bw" in fields else None
    return NetworkProfile(spec, rtt, bw)


class LinkShaper:
    """One direction of a shaped link: a token bucket at the bandwidth, then half the RTT.

    `arrival_time(n)` says when a message of n bytes sent now would reach the peer on that
    link; the sender holds the message until then. Messages keep their order.
    """

    def __init__(self, profile: NetworkProfile | None) -> None:
        self.profile = profile if profile is not None and profile.shaped else None
        self._busy_until = 0.0
        self._lock = threading.Lock()

    def arrival_time(self, nbytes: int, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        if self.profile is None:
            return now
        with self._lock:
            start = max(now, self._busy_until)
            bw = self.profile.bandwidth_bps
            done = start + (nbytes * 8 / bw if bw else 0.0)
            self._busy_until = done
        return done + self.profile.rtt_s / 2

    @staticmethod
    def hold_until(when: float) -> None:
        delay = when - time.monotonic()
        if delay > 0:
            time.sleep(delay)
