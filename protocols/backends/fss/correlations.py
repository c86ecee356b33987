"""The correlated randomness of the fss backend, as the dealer makes it and the parties derive it.

Every mask comes from AES-128-CTR streams (`prg.py`) keyed with 128-bit seeds from the OS
(DESIGN.md invariants): each party's seed is known to that party and the dealer only; the
dealer's own seed, which keys the DCFs, never leaves it. Correlation k of a session uses
streams numbered from k, so a party derives its own masks locally and asks the dealer only
for what depends on both parties' masks:

1. Beaver product of an activation x and a session constant w (a weight; Beaver 1991) under
   op (conv2d, linear, matmul, mul): B_i is party i's stream of the constant (fixed for the
   session, so W - B is opened once), A_i and, for party 1, C_i are its streams of index k;
   the dealer sends party 0 C_0 = op(A, B) - C_1.
   A product of two activations (attention's Q K^T): A_i and B_i are party i's streams 0 and 2
   of index k, and the dealer sends party 0 C_0 = op(A, B) - C_1.
2. Beaver square: r_i, and for party 1 s_1, are its streams of index k; party 0 gets
   s_0 = r^2 - s_1 (fixed point: r^2 carries 32 fractional bits until truncated).
3. ReLU keys (BCG+21; `relu.py`): the dealer keys n DCFs from its own stream of index k and
   sends each party its own key (the correction words go to both).
4. Faithful truncation keys (division by a public d) and fused truncation-and-ReLU keys
   (`truncation.py`): made and sent as ReLU keys are.
5. fss-compact's two-round ReLU keys (`select_relu.py`): made and sent as ReLU keys are.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from ...roles import CLIENT, SERVER
from ..base import BackendError, CorrelationKind, DealerSeeds
from . import ring
from .prg import AesCtrPrg, ctr_uint64
from .relu import relu_keys
from .select_relu import select_relu_keys
from .truncation import trunc_keys, trunc_relu_keys

BEAVER, SQUARE, RELU = "fss.beaver", "fss.square", "fss.relu"
SECRET_PRODUCT = "fss.secret_product"
TRUNC, TRUNC_RELU = "fss.trunc", "fss.trunc_relu"
SELECT_RELU = "fss.select_relu"
PRODUCT_OPS = ("conv2d", "linear", "matmul", "mul")
MAX_ELEMENTS = 2**27  # as for CrypTen's tuples: 1 GiB of int64 per array
_STREAMS = 4  # streams per correlation index: A (or r), C (or s), B (a second activation's mask), spare
_A, _C, _B = 0, 1, 2


def stream(seed: bytes, index: int, which: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Ring elements (int64) of stream `which` of correlation `index` under `seed`."""
    return ring.from_numpy_u64(ctr_uint64(seed, tuple(shape), stream=index * _STREAMS + which)).reshape(shape)


def _value(x: ring.Operand) -> torch.Tensor:
    return x.value if isinstance(x, ring.Split) else x


def product(op: str, a: ring.Operand, b: ring.Operand, attrs: dict[str, Any]) -> torch.Tensor:
    """op(a, b) in Z_2^64: the bilinear maps a Beaver product may be asked for."""
    if op == "conv2d":
        return ring.conv2d(a, b, stride=tuple(attrs["stride"]), padding=tuple(attrs["padding"]),
                           dilation=tuple(attrs["dilation"]), groups=int(attrs["groups"]))  # fmt: skip
    if op == "linear":  # x W^T, W as the layer stores it
        return ring.matmul(a, b.t())
    if op == "matmul":
        return ring.matmul(a, b)
    if op == "mul":
        return _value(a) * _value(b)
    raise ValueError(f"unknown product op '{op}' (known: {', '.join(PRODUCT_OPS)})")


def _shape(value: Any, what: str) -> tuple[int, ...]:
    if not (isinstance(value, list) and all(isinstance(d, int) and 0 <= d < 2**31 for d in value)):
        raise ValueError(f"{what} must be a list of non-negative ints, got {value!r}")
    if int(np.prod(value)) > MAX_ELEMENTS:
        raise ValueError(f"{what} {value} exceeds the dealer's limit of {MAX_ELEMENTS} elements")
    return tuple(value)


def _decode_beaver(args_json: str) -> tuple[list, dict]:
    try:
        a = json.loads(args_json)
        op, attrs, b_index = a["op"], dict(a.get("attrs", {})), int(a["b_index"])
        x_shape, w_shape = _shape(a["x_shape"], "x_shape"), _shape(a["w_shape"], "w_shape")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"malformed {BEAVER} request: {err}") from None
    if op not in PRODUCT_OPS:
        raise ValueError(f"unknown product op '{op}' (known: {', '.join(PRODUCT_OPS)})")
    return [op, x_shape, w_shape, b_index, attrs], {}


def _make_beaver(seeds: DealerSeeds, index: int, role: str, args: list, kwargs: dict) -> dict[str, np.ndarray]:
    op, x_shape, w_shape, b_index, attrs = args
    a = stream(seeds.aes[0], index, _A, x_shape) + stream(seeds.aes[1], index, _A, x_shape)
    b = stream(seeds.aes[0], b_index, _A, w_shape) + stream(seeds.aes[1], b_index, _A, w_shape)
    c = product(op, a, b, attrs)
    c0 = c - stream(seeds.aes[1], index, _C, tuple(c.shape))
    return {"c": ring.to_numpy_u64(c0)}


def _decode_secret_product(args_json: str) -> tuple[list, dict]:
    try:
        a = json.loads(args_json)
        op, x_shape, y_shape = a["op"], _shape(a["x_shape"], "x_shape"), _shape(a["y_shape"], "y_shape")
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"malformed {SECRET_PRODUCT} request: {err}") from None
    if op not in ("matmul", "mul"):
        raise ValueError(f"{SECRET_PRODUCT}: op must be matmul or mul, got {op!r}")
    try:
        x, y = torch.empty(x_shape, device="meta"), torch.empty(y_shape, device="meta")
        out = torch.matmul(x, y).shape if op == "matmul" else torch.broadcast_shapes(x_shape, y_shape)
    except RuntimeError:
        raise ValueError(f"{SECRET_PRODUCT}: {op} of shapes {list(x_shape)} and {list(y_shape)} is undefined") from None
    _shape(list(out), "the product's shape")
    return [op, x_shape, y_shape], {}


def _make_secret_product(seeds: DealerSeeds, index: int, role: str, args: list, kwargs: dict) -> dict[str, np.ndarray]:
    op, x_shape, y_shape = args
    a = stream(seeds.aes[0], index, _A, x_shape) + stream(seeds.aes[1], index, _A, x_shape)
    b = stream(seeds.aes[0], index, _B, y_shape) + stream(seeds.aes[1], index, _B, y_shape)
    c = product(op, a, b, {})
    return {"c": ring.to_numpy_u64(c - stream(seeds.aes[1], index, _C, tuple(c.shape)))}


def _decode_square(args_json: str) -> tuple[list, dict]:
    try:
        return [_shape(json.loads(args_json)["shape"], "shape")], {}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"malformed {SQUARE} request: {err}") from None


def _make_square(seeds: DealerSeeds, index: int, role: str, args: list, kwargs: dict) -> dict[str, np.ndarray]:
    (shape,) = args
    r = stream(seeds.aes[0], index, _A, shape) + stream(seeds.aes[1], index, _A, shape)
    return {"s": ring.to_numpy_u64(r * r - stream(seeds.aes[1], index, _C, shape))}


def _decode_relu(args_json: str) -> tuple[list, dict]:
    try:
        a = json.loads(args_json)
        n, bits = int(a["n"]), int(a["bits"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"malformed {RELU} request: {err}") from None
    if not 0 <= n <= MAX_ELEMENTS or not 2 <= bits <= 64:
        raise ValueError(f"{RELU}: n must be in [0, {MAX_ELEMENTS}] and bits in [2, 64], got n={n} bits={bits}")
    return [n, bits], {}


def _make_relu(seeds: DealerSeeds, index: int, role: str, args: list, kwargs: dict) -> dict[str, dict[str, np.ndarray]]:
    """Both parties' keys, from the dealer's own stream of this index (the dealer keeps one
    party's until it asks)."""
    n, bits = args
    return _paired_keys(relu_keys(n, bits, AesCtrPrg(seeds.dealer, stream=index)))


def _decode_select_relu(args_json: str) -> tuple[list, dict]:
    n, bits = _int_args(SELECT_RELU, args_json, ("n", "bits"))
    _check_n_bits(SELECT_RELU, n, bits)
    return [n, bits], {}


def _make_select_relu(seeds: DealerSeeds, index: int, role: str, args: list, kwargs: dict) -> dict[str, dict[str, np.ndarray]]:
    """Both parties' two-round ReLU keys, from the dealer's own stream of this index."""
    n, bits = args
    return _paired_keys(select_relu_keys(n, bits, AesCtrPrg(seeds.dealer, stream=index)))


def _int_args(kind: str, args_json: str, names: tuple[str, ...]) -> list[int]:
    """The named integer fields of a request (JSON ints only: a float or a bool is refused)."""
    try:
        a = json.loads(args_json)
        values = [a[name] for name in names]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"malformed {kind} request: {err!r}") from None
    for name, v in zip(names, values):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"malformed {kind} request: {name} must be an integer, got {v!r}")
    return values


def _check_n_bits(kind: str, n: int, bits: int) -> None:
    if not 0 <= n <= MAX_ELEMENTS or not 2 <= bits <= 64:
        raise ValueError(f"{kind}: n must be in [0, {MAX_ELEMENTS}] and bits in [2, 64], got n={n} bits={bits}")


def _decode_trunc(args_json: str) -> tuple[list, dict]:
    n, bits, divisor = _int_args(TRUNC, args_json, ("n", "bits", "divisor"))
    _check_n_bits(TRUNC, n, bits)
    if not 1 <= divisor < 2**64:
        raise ValueError(f"{TRUNC}: divisor must be in [1, 2^64), got {divisor}")
    return [n, bits, divisor], {}


def _decode_trunc_relu(args_json: str) -> tuple[list, dict]:
    n, bits, shift = _int_args(TRUNC_RELU, args_json, ("n", "bits", "shift"))
    _check_n_bits(TRUNC_RELU, n, bits)
    if not 1 <= shift <= bits - 1:
        raise ValueError(f"{TRUNC_RELU}: shift must be in [1, bits - 1] = [1, {bits - 1}], got {shift}")
    return [n, bits, shift], {}


def _paired_keys(keys: tuple) -> dict[str, dict[str, np.ndarray]]:
    return {role: {"key": np.frombuffer(key.to_bytes(), dtype=np.uint8)} for role, key in zip((SERVER, CLIENT), keys)}


def _make_trunc(seeds: DealerSeeds, index: int, role: str, args: list, kwargs: dict) -> dict[str, dict[str, np.ndarray]]:
    """Both parties' division keys, from the dealer's own stream of this index."""
    n, bits, divisor = args
    return _paired_keys(trunc_keys(n, bits, divisor, AesCtrPrg(seeds.dealer, stream=index)))


def _make_trunc_relu(seeds: DealerSeeds, index: int, role: str, args: list, kwargs: dict) -> dict[str, dict[str, np.ndarray]]:
    """Both parties' truncated-ReLU keys, from the dealer's own stream of this index."""
    n, bits, shift = args
    return _paired_keys(trunc_relu_keys(n, bits, shift, AesCtrPrg(seeds.dealer, stream=index)))


CORRELATIONS = (
    CorrelationKind(BEAVER, (SERVER,), _decode_beaver, _make_beaver),
    CorrelationKind(SQUARE, (SERVER,), _decode_square, _make_square),
    CorrelationKind(SECRET_PRODUCT, (SERVER,), _decode_secret_product, _make_secret_product),
    CorrelationKind(RELU, (SERVER, CLIENT), _decode_relu, _make_relu, paired=True),
    CorrelationKind(TRUNC, (SERVER, CLIENT), _decode_trunc, _make_trunc, paired=True),
    CorrelationKind(TRUNC_RELU, (SERVER, CLIENT), _decode_trunc_relu, _make_trunc_relu, paired=True),
)
COMPACT_CORRELATIONS = CORRELATIONS + (CorrelationKind(SELECT_RELU, (SERVER, CLIENT), _decode_select_relu, _make_select_relu, paired=True),)


def fetch_key(dealer, kind: str, request: dict, key_type: type, party: int, n: int, bits: int):
    """This party's key of `kind` for n elements at width `bits` from its dealer client (a view of
    the reply: read, never copied again), checked against what it asked for; BackendError if not."""
    index = dealer.next_index()
    blob = dealer.request(kind, json.dumps(request), index)["key"]
    try:
        key = key_type.from_bytes(blob)
    except ValueError as err:
        raise BackendError(f"got a malformed {kind} key from the dealer: {err}") from None
    if key.party != party or key.n_elements != n or key.bits != bits:
        raise BackendError(
            f"got a {kind} key for party {key.party}, {key.n_elements} elements at {key.bits} bits from the dealer; "
            f"it asked for party {party}, {n} elements at {bits} bits"
        )
    return key
