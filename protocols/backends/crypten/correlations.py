"""The correlated randomness CrypTen's protocols ask for, as the dealer makes it.

Protocol (CrypTen's trusted third party, Knott et al., "CrypTen", NeurIPS 2021, appendix):
1. At session start the dealer draws one seed per party and sends it to that party only.
2. For the k-th tuple of the session each party draws its shares of a, b (and, for party 1,
   of c) from a generator seeded with derive_seed(its seed, k); the dealer derives the same
   generators, so it knows a and b in the clear.
3. Party 0 asks for tuple k by public size and kind; the dealer computes c = op(a, b) and
   returns c0 = c - c1 to party 0 alone. Party 1 never talks to the dealer after step 1.
The math of step 3 is CrypTen's own (`TTPServer`), run on generators derived here.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np
import torch

from ...roles import SERVER
from ..base import CorrelationKind, DealerSeeds
from ..fss.correlations import CORRELATIONS as _FSS_CORRELATIONS
from ..fss.correlations import TRUNC
from . import patches

EXACT_TRUNCATION = next(kind for kind in _FSS_CORRELATIONS if kind.name == TRUNC)

# Kinds of tuple CrypTen's TTP provider requests (crypten.mpc.provider.ttp_provider.TTP_FUNCTIONS).
KINDS = ("additive", "square", "binary", "wraps", "B2A")
# Who may ask the dealer for a kind's share: CrypTen's provider asks on party 0's behalf only.
REQUESTERS = (SERVER,)
# Ops a Beaver triple may be requested for: the linear layers twinfer runs.
TRIPLE_OPS = {"mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d"}
# Largest tuple the dealer makes (elements of one tensor): 1 GiB of int64, as the transport allows.
MAX_TUPLE_ELEMENTS = 2**27


def derive_seed(seed: int, index: int) -> int:
    """The seed of a party's generator for the session's index-th tuple (a keyed hash)."""
    digest = hashlib.blake2b(index.to_bytes(8, "little"), key=seed.to_bytes(8, "little", signed=True), digest_size=8)
    return int.from_bytes(digest.digest(), "little", signed=True)


def tuple_generator(seed: int, index: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(derive_seed(seed, index))
    return g


def decode_request(kind: str, args_json: str) -> tuple[list, dict]:
    """Validate a tuple request: a known kind, integer sizes, a whitelisted op."""
    if kind not in KINDS:
        raise ValueError(f"unknown tuple function '{kind}' (known: {', '.join(KINDS)})")
    try:
        payload = json.loads(args_json or "{}")
        args, kwargs = list(payload.get("args", [])), dict(payload.get("kwargs", {}))
    except (ValueError, AttributeError, TypeError) as err:
        raise ValueError(f"malformed tuple request arguments: {err}") from None
    n_sizes = 2 if kind in ("additive", "binary") else 1
    if len(args) < n_sizes:
        raise ValueError(f"'{kind}' needs {n_sizes} sizes, got {len(args)} arguments")
    for size in args[:n_sizes]:
        if not (isinstance(size, list) and all(isinstance(d, int) and 0 <= d < 2**31 for d in size)):
            raise ValueError(f"tuple sizes must be lists of non-negative ints, got {size!r}")
        if math.prod(size) > MAX_TUPLE_ELEMENTS:
            raise ValueError(f"tuple size {size} exceeds the dealer's limit of {MAX_TUPLE_ELEMENTS} elements")
    if kind == "additive":
        if len(args) < 3 or not isinstance(args[2], str) or args[2] not in TRIPLE_OPS:
            raise ValueError(f"'additive' op must be one of {sorted(TRIPLE_OPS)}, got {args[2:3]}")
        args = [torch.Size(args[0]), torch.Size(args[1]), *args[2:]]
    else:
        args = [torch.Size(a) for a in args[:n_sizes]] + args[n_sizes:]
    return args, kwargs


def make_share(seeds: list[int], index: int, kind: str, args: list, kwargs: dict[str, Any]) -> torch.Tensor:
    """Party 0's share of tuple `index` (CrypTen's TTPServer arithmetic on derived generators)."""
    patches.load_crypten()
    from crypten.mpc.provider.ttp_provider import TTPServer

    math_ = object.__new__(TTPServer)  # TTPServer.__init__ would start a torch.distributed loop
    math_.device = "cpu"
    math_.generators = [tuple_generator(s, index) for s in seeds]
    math_.generators_cuda = [None] * len(seeds)
    return getattr(math_, kind)(*args, **kwargs)


def _kind(name: str) -> CorrelationKind:
    return CorrelationKind(
        name,
        REQUESTERS,
        decode=lambda args_json: decode_request(name, args_json),
        make=lambda seeds, index, role, args, kwargs: {"share": _share(seeds, index, name, args, kwargs)},
    )


def _share(seeds: DealerSeeds, index: int, kind: str, args: list, kwargs: dict) -> np.ndarray:
    return make_share([seeds.torch[0], seeds.torch[1]], index, kind, args, kwargs).contiguous().numpy()


FIXED_B = "crypten.fixed_b"
PRODUCT_OPS = ("conv2d", "linear", "matmul", "mul")


def ring_product(op: str, a: torch.Tensor, b: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """op(a, b) on int64 shares (wrapping), as CrypTen's Beaver protocol computes it."""
    if op == "linear":
        return torch.matmul(a, b.t())
    return getattr(torch, op)(a, b, **kwargs)


def product_shape(op: str, a_shape: tuple[int, ...], b_shape: tuple[int, ...], kwargs: dict) -> tuple[int, ...]:
    """The shape of op(a, b), from meta tensors: no arithmetic is done."""
    meta = {"dtype": torch.int64, "device": "meta"}
    return tuple(ring_product(op, torch.empty(a_shape, **meta), torch.empty(b_shape, **meta), kwargs).shape)


def fixed_b_draws(generator: torch.Generator, size: tuple[int, ...]) -> torch.Tensor:
    patches.load_crypten()
    from crypten.common.rng import generate_random_ring_element

    return generate_random_ring_element(torch.Size(size), generator=generator)


def _decode_fixed_b(args_json: str) -> tuple[list, dict]:
    try:
        a = json.loads(args_json)
        op, b_index, kwargs = a["op"], int(a["b_index"]), dict(a.get("kwargs", {}))
        sizes = [a["x_size"], a["w_size"]]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"malformed {FIXED_B} request: {err}") from None
    if op not in PRODUCT_OPS:
        raise ValueError(f"'{FIXED_B}' op must be one of {list(PRODUCT_OPS)}, got {op!r}")
    for size in sizes:
        if not (isinstance(size, list) and all(isinstance(d, int) and 0 <= d < 2**31 for d in size)):
            raise ValueError(f"tuple sizes must be lists of non-negative ints, got {size!r}")
        if math.prod(size) > MAX_TUPLE_ELEMENTS:
            raise ValueError(f"tuple size {size} exceeds the dealer's limit of {MAX_TUPLE_ELEMENTS} elements")
    return [op, tuple(sizes[0]), tuple(sizes[1]), b_index, kwargs], {}


def _make_fixed_b(seeds: DealerSeeds, index: int, role: str, args: list, kwargs: dict) -> dict[str, np.ndarray]:
    """c_0 = op(A, B) - c_1: A and c_1 from the parties' generators of `index`, B from those of
    the constant's own index (fixed for the session, so W - B was opened once)."""
    op, x_size, w_size, b_index, op_kwargs = args
    gens = [tuple_generator(seeds.torch[r], index) for r in (0, 1)]
    a = fixed_b_draws(gens[0], x_size) + fixed_b_draws(gens[1], x_size)
    b = sum(fixed_b_draws(tuple_generator(seeds.torch[r], b_index), w_size) for r in (0, 1))
    c = ring_product(op, a, b, op_kwargs)
    return {"share": (c - fixed_b_draws(gens[1], tuple(c.shape))).contiguous().numpy()}


# An exact truncation is the fss backend's protocol on CrypTen's shares: the same dealer kind.
CORRELATIONS = tuple(_kind(k) for k in KINDS) + (CorrelationKind(FIXED_B, REQUESTERS, _decode_fixed_b, _make_fixed_b), EXACT_TRUNCATION)
