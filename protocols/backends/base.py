"""What a secure protocol backend provides: shares, products, comparisons, and their prices.

A backend holds one session's collaborators (the communicator to the peer, the source of
correlated randomness) given to it by the party that builds it; ops receive the backend as
an argument (`ops.registry.SecureContext`) and never reach for a global. Its shared values
support the local operations of additive sharing as methods and operators: `+`, `-`, `*` and
`+` with public or shared tensors of the same layout, `reshape`, `flatten`, `index_select`,
`permute`, `sum(dim, keepdim)`, `shape`, `nelement()`. Everything that talks to the peer is a method here.

Parties are ranks: 0 the server (owns the weights), 1 the client (owns the input).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .channels import CorrelationSource, PeerChannel

RING_BYTES = 8  # shares live in Z_2^64: one ring element is 8 bytes on the wire
# Fixed point: a real x is round(x * 2^f) in the ring, f fractional bits. A session parameter
# both parties agree on (--fraction-bits): fewer bits hold larger values, more bits finer ones.
DEFAULT_FRACTION_BITS = 16
FRACTION_BITS_RANGE = (1, 30)  # a product carries 2f fractional bits before truncation: 2f < 63


AUTO = "auto"  # a session's fractional bits chosen by the server's check (protocols/passes/encoding.py)


def check_session_bits(bits: object) -> int | str:
    """A session's --fraction-bits: 'auto' or an integer in FRACTION_BITS_RANGE (a ValueError otherwise)."""
    return AUTO if bits == AUTO else check_fraction_bits(bits)


def check_fraction_bits(bits: object) -> int:
    """`bits` as an int in FRACTION_BITS_RANGE, or a ValueError that says what is allowed."""
    lo, hi = FRACTION_BITS_RANGE
    if not isinstance(bits, int) or isinstance(bits, bool) or not lo <= bits <= hi:
        raise ValueError(f"fraction bits must be 'auto' or an integer from {lo} to {hi}, got {bits!r}")
    return bits
OPEN_BYTES = 2 * RING_BYTES  # one opened element: send my share, receive theirs
SERVER_RANK, CLIENT_RANK = 0, 1


class BackendError(ValueError):
    """A backend refuses what it was handed: a missing collaborator, a malformed key, a peer's
    array of the wrong shape. The party reports it as a protocol error on every party."""


TRUNCATION_KINDS = ("local", "exact")


@dataclass(frozen=True)
class Truncation:
    """How a secure op truncates (or divides) the values it must scale back, chosen per layer.

    `local`: the two-party local truncation (SecureML): free, off by one unit in the last place,
    and wrong by a whole 2^(64 - s) with probability |y| / 2^64 for a value y (ring units).
    `exact`: from the dealer's keys (a comparison on the masked value's low `bits` bits: LLAMA,
    SIGMA): one round, never wrong while |y| < 2^(bits - 1) ring units, off by one unit at most.
    `fused`: an exact truncation a backend may leave to the comparison that reads the value
    next (fss opens a product for its ReLU anyway, so truncating there costs no round).
    Both round stochastically: the result is floor(y / 2^s) + 1 with probability frac(y / 2^s).
    """

    kind: str = "local"
    bits: int = 64
    fused: bool = False

    def __post_init__(self) -> None:
        if self.kind not in TRUNCATION_KINDS:
            raise ValueError(f"truncation kind must be one of {TRUNCATION_KINDS}, got {self.kind!r}")
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 64:
            raise ValueError(f"truncation width must be an integer from 2 to 64, got {self.bits!r}")
        if self.fused and self.kind != "exact":
            raise ValueError("only an exact truncation can be fused into the comparison that follows")

    @property
    def exact(self) -> bool:
        return self.kind == "exact"

    def as_attr(self) -> dict:
        """The node attribute `truncation` (public structure: it travels to the client)."""
        return {"kind": self.kind, "bits": self.bits} | ({"fused": True} if self.fused else {})

    @classmethod
    def from_attr(cls, value: Any) -> "Truncation":
        """A node's `truncation` attribute (JSON from the peer: checked); absent means local."""
        if value is None:
            return LOCAL
        if not isinstance(value, dict) or set(value) - {"kind", "bits", "fused"}:
            raise ValueError(f"a truncation attribute is {{'kind', 'bits'[, 'fused']}}, got {value!r}")
        return cls(value.get("kind", "local"), value.get("bits", 64), bool(value.get("fused", False)))


LOCAL = Truncation()


@dataclass(frozen=True)
class Cost:
    """Cost of one protocol step: one party's online bytes (sent + received), rounds, and the
    bytes the dealer sends both parties for it (None where the backend's pricing does not say)."""

    bytes_online: int = 0
    rounds: int = 0
    bytes_offline: int | None = None

    def __add__(self, other: "Cost") -> "Cost":
        """Two steps one after the other: their bytes and rounds add up."""
        offline = None if self.bytes_offline is None or other.bytes_offline is None else self.bytes_offline + other.bytes_offline
        return Cost(self.bytes_online + other.bytes_online, self.rounds + other.rounds, offline)


@dataclass(frozen=True)
class DealerSeeds:
    """A session's seeds as the dealer holds them, by rank: each party holds only its own."""

    torch: dict[int, int]  # 64-bit, for CrypTen's (torch) generators
    aes: dict[int, bytes]  # 128-bit, for the AES-CTR streams of twinfer's own backends
    dealer: bytes = b""  # 128-bit, the dealer's own (keys DCFs); never leaves the dealer


@dataclass(frozen=True)
class CorrelationKind:
    """One kind of correlated randomness the dealer makes for a backend.

    `decode` checks a request's public arguments (JSON) and returns them; `make` returns the
    asking party's part of correlation `index` (named arrays: shares, key bytes as uint8)
    from the session's seeds; only `requesters` (roles) may ask for it, the others derive
    their part from their own seed. With `paired`, `make` returns every requester's part at
    once ({role: arrays}) and the dealer keeps the others' until they ask, so a correlation
    is made once however many parties ask for it.
    """

    name: str
    requesters: tuple[str, ...]
    decode: Callable[[str], tuple[list, dict]]
    make: Callable[[DealerSeeds, int, str, list, dict], dict]
    paired: bool = False


class Pricing(abc.ABC):
    """A backend's online cost per primitive, read off the protocols it runs."""

    def product(self, activations: int, weights: int, outputs: int) -> Cost:
        """A Beaver product of an activation and a weight: x - a and W - b opened together."""
        return Cost(OPEN_BYTES * (activations + weights), 1)

    def secret_product(self, left: int, right: int, outputs: int) -> Cost:
        """A Beaver product of two activations (Q K^T, a softmax's normaliser): both masked operands
        opened in one round, neither mask fixed for the session."""
        return Cost(OPEN_BYTES * (left + right), 1)

    def square(self, n: int) -> Cost:
        """A Beaver square of n elements: open x - r."""
        return Cost(OPEN_BYTES * n, 1 if n else 0)

    def reveal(self, n: int) -> Cost:
        """Opening n elements to one party (the logits, to the client)."""
        return Cost(RING_BYTES * n, 1)

    @abc.abstractmethod
    def relu(self, n: int, bits: int = 64) -> Cost:
        """n ReLUs evaluated together, compared on `bits` bits."""

    @abc.abstractmethod
    def max_pool(self, windows: int, n: int, bits: int = 64) -> Cost:
        """The maximum of each of `windows` windows of n elements."""

    @abc.abstractmethod
    def truncation(self, n: int, truncation: "Truncation") -> Cost:
        """Truncating (or dividing) n values as `truncation` says: local is free; an exact one opens
        the masked values (one round) with the dealer's keys, unless it is fused into a comparison."""

    def relu_and_square(self, relus: int, squares: int, bits: int = 64) -> Cost:
        """A masked site's ReLUs and squares (`Backend.relu_and_square`): one after the other here."""
        return self.relu(relus, bits) + self.square(squares)


class Backend(abc.ABC):
    """One session's secure protocol; a party builds it with its communicator and randomness."""

    name: ClassVar[str]
    pricing: ClassVar[Pricing]
    # Kinds of correlated randomness this backend asks the dealer for.
    correlations: ClassVar[tuple[CorrelationKind, ...]]
    # Whether each party gets a 128-bit AES-CTR seed from the dealer besides the 64-bit one.
    aes_seed: ClassVar[bool] = False
    # What the range check (protocols/passes/ranges.py) must know of the backend's fixed point:
    # whether comparisons use a node's `bits` width (else the full ring), and the value a
    # padded max-pool pads with (-2^pool_pad_bits ring units: an input below it loses to the pad).
    narrow_comparisons: ClassVar[bool] = False
    pool_pad_bits: ClassVar[int] = 62
    # How a public value (a polynomial's coefficient, an addend) is encoded: "nearest" (round(x 2^f))
    # or "toward_zero" (CrypTen's encoder: int(x 2^f)); the fixed-point simulation mimics it.
    public_rounding: ClassVar[str] = "nearest"
    # Whether an exact truncation can be left to the ReLU that reads the product (Truncation.fused).
    fuses_truncation: ClassVar[bool] = False
    # Whether it can run without a dealer, the server making the correlations (insecure, development only).
    trusted_first_party: ClassVar[bool] = False

    rank: int

    # -- session lifecycle ---------------------------------------------------------------------

    @classmethod
    def prepare(cls) -> None:
        """Load what the backend needs (libraries, tables) before a session's clock starts."""

    @classmethod
    @abc.abstractmethod
    def create(cls, rank: int, transport: PeerChannel, dealer: CorrelationSource | None, fraction_bits: int = DEFAULT_FRACTION_BITS) -> "Backend":
        """The backend of one session: `transport` reaches the peer (send/recv/metrics), `dealer`
        is this party's dealer client (None: the insecure trusted first party, where supported),
        `fraction_bits` the session's fixed-point precision (both parties the same)."""

    def start(self) -> None:
        """Called once before the first share; the backend binds its collaborators here."""

    def stop(self) -> None:
        """Called once when the session ends, also after a failure."""

    def reset_stats(self) -> None:
        """Start the backend's own counters of a batch afresh."""

    def stats(self) -> dict[str, float]:
        """The backend's own counters since reset_stats (twinfer's metrics count the wire)."""
        return {}

    # -- sharing -----------------------------------------------------------------------------------

    @abc.abstractmethod
    def share(self, value: torch.Tensor, src: int, *, constant: str | None = None) -> Any:
        """Secret-share `value`, owned by rank `src`; other ranks pass a zero tensor of its shape.

        `constant` names a value fixed for the whole session (a weight): a backend may then
        open its Beaver mask once, at sharing, instead of in every product."""

    @abc.abstractmethod
    def reveal(self, x: Any, dst: int) -> torch.Tensor | None:
        """Open `x` to rank `dst` only; every other rank gets None."""

    @abc.abstractmethod
    def cat(self, parts: list[Any], dim: int) -> Any:
        """Concatenate shared tensors (local)."""

    # -- products (one Beaver product each); every product and division is truncated as `truncation` says --

    @abc.abstractmethod
    def conv2d(
        self, x: Any, w: Any, *, stride: tuple, padding: tuple, dilation: tuple, groups: int, truncation: Truncation = LOCAL
    ) -> Any: ...

    @abc.abstractmethod
    def matmul(self, x: Any, w: Any, truncation: Truncation = LOCAL) -> Any:
        """x @ w (batched, broadcasting); `w` a weight or another activation (attention's products)."""

    @abc.abstractmethod
    def linear(self, x: Any, w: Any, truncation: Truncation = LOCAL) -> Any:
        """x W^T for a weight W stored as the layer stores it (outputs first)."""

    @abc.abstractmethod
    def mul(self, x: Any, y: Any, truncation: Truncation = LOCAL) -> Any:
        """Elementwise product of two shared tensors (broadcasting)."""

    @abc.abstractmethod
    def square(self, x: Any, truncation: Truncation = LOCAL) -> Any: ...

    @abc.abstractmethod
    def scale(self, x: Any, factor: torch.Tensor, truncation: Truncation = LOCAL) -> Any:
        """x times a public tensor (broadcasting), encoded at the session's fixed point: local but
        for its truncation."""

    # -- comparisons ------------------------------------------------------------------------------------

    @abc.abstractmethod
    def relu(self, x: Any, bits: int | None = None) -> Any:
        """ReLU of every element; `bits`: the comparison width a backend may use (None: the full
        ring, exact for every value; fewer bits are exact while |x| < 2^(bits - 1) ring units).
        `x` may still hold a product whose exact truncation was left to it (Truncation.fused)."""

    def note_least(self, x: Any) -> None:
        """What an analysis backend records of x: its smallest value (a LayerNorm's variance, which
        sets how finely it normalises and so its error); a party's backend does nothing."""

    def relu_and_square(self, x: Any, y: Any, bits: int | None = None, truncation: Truncation = LOCAL) -> tuple[Any, Any]:
        """(ReLU of x, square of y), independent of each other (a masked site's kept and other
        positions); a backend that can open both in the same round overrides this."""
        return self.relu(x, bits), self.square(y, truncation)

    @abc.abstractmethod
    def max_pool2d(self, x: Any, *, kernel: tuple, stride: tuple, padding: tuple, bits: int | None = None) -> Any: ...

    # -- local (but for the division's truncation) -----------------------------------------------------

    @abc.abstractmethod
    def avg_pool2d(self, x: Any, *, kernel: tuple, stride: tuple, padding: tuple, truncation: Truncation = LOCAL) -> Any:
        """The window sums divided by the window's size (a public integer), truncated as `truncation` says."""

    @abc.abstractmethod
    def divide(self, x: Any, divisor: int, truncation: Truncation = LOCAL) -> Any:
        """x divided by a public positive integer (a mean's count), as a truncation divides: exact
        where 1 / divisor has no exact fixed-point encoding."""
