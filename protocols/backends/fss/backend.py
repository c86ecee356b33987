"""The `fss` backend: additive shares in Z_2^64, Beaver products with weights opened once, and
ReLU in one online round from the dealer's DCF keys (BCG+21; research note fss.md).

Values are fixed point with the session's fractional bits (16 by default, `ring.py`), shared between rank 0 (the
server) and rank 1 (the client). Per op:

1. Sharing: at session start the parties exchange 16-byte seeds; their XOR keys a common
   AES-CTR stream. The non-owner's share of a value is the next draw from that stream (the
   owner knows it, which is harmless: the value is its own), the owner's is value - draw: no
   bytes online. A session constant (a weight) also gets its Beaver mask B here, and W - B is
   opened once, so products never open a weight again.
2. Product of an activation x with a constant W (conv, linear, embedding, per-channel scale):
   open E = X - A (one round), then party i holds [i = 0] E.F + E.B_i + A_i.F + C_i with F =
   W - B, then the local two-party truncation. Party 1 derives A_1 and C_1 from its seed;
   party 0 gets C_0 from the dealer. A product of two activations (attention's Q K^T) opens
   E = X - A and F = Y - B together, both masks fresh.
3. Square: open e = x - r; x^2 = e^2 + 2 e r + r^2, truncated.
4. ReLU: open x_hat = x + r (one round, one ring element each way), then evaluate this
   party's DCF key locally (`relu.py`); exact for every 64-bit value at the default width.
5. Max-pool: a tree of max(a, b) = b + ReLU(a - b), one ReLU call per level (2 rounds for a
   2x2 window). Average pooling: a local window sum divided by k, locally as a truncation is.
6. Reveal: the other party sends its share.
7. Truncation, per layer (Truncation): local (SecureML, free, wrong with probability |y| / 2^64),
   or exact from the dealer's keys (truncation.py: open y + r, one round); a product's exact
   truncation that only a ReLU reads is left to it (`FssShare.pending`) and done in the ReLU's
   one opening with a fused key, so it costs no round.

`fss-compact` is the same backend with step 4 in two rounds (`select_relu.py`): x_hat, then
one packed bit per element each way, from keys of about half the bytes.

The backend holds its transport (send/recv/metrics) and its dealer client (the party's seed
and its requests); it never reaches for a global.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from ..channels import CorrelationSource, PeerChannel
from ..base import DEFAULT_FRACTION_BITS, LOCAL, Backend, BackendError, SERVER_RANK, Truncation, check_fraction_bits
from . import ring
from .correlations import (
    BEAVER, COMPACT_CORRELATIONS, CORRELATIONS, RELU, SECRET_PRODUCT, SELECT_RELU, SQUARE, TRUNC, TRUNC_RELU, fetch_key, product,
    stream,
)  # fmt: skip
from .dcf import over_chunks
from .pricing import KEY_CHUNK, FssCompactPricing, FssPricing
from .prg import AesCtrPrg
from .relu import ReluKey, masked_share, relu_eval
from .select_relu import SelectReluKey, select_bits, select_relu_eval
from .truncation import TruncKey, TruncReluKey, trunc_eval, trunc_masked_share, trunc_relu_eval, trunc_relu_masked_share

_A, _C, _B = 0, 1, 2
_POOL_PAD = -(1 << 46)  # a public value below any activation the range check lets through (2^(46-f) in real units)


class FssShare:
    """One party's additive share (int64, fixed point) of a tensor, with the local operations.

    `pending`: a product still at 2f fractional bits whose exact truncation, of that width, is
    left to the ReLU that reads it (Truncation.fused); None for a value at the session's bits."""

    __slots__ = ("data", "party", "constant", "frac", "pending")

    def __init__(
        self, data: torch.Tensor, party: int, constant: "_Constant | None" = None, frac: int = ring.FRACTION_BITS,
        pending: int | None = None,
    ) -> None:
        self.data, self.party, self.constant, self.frac, self.pending = data, party, constant, frac, pending

    def _new(self, data: torch.Tensor, frac: int | None = None) -> "FssShare":
        return FssShare(data, self.party, frac=self.frac if frac is None else frac, pending=self.pending)

    def _aligned(self, other: "FssShare") -> tuple[torch.Tensor, torch.Tensor, int]:
        """Both operands at the larger of their fractional bits (a left shift is exact)."""
        frac = max(self.frac, other.frac)
        return self.data << (frac - self.frac), other.data << (frac - other.frac), frac

    def _public(self, value: Any) -> torch.Tensor:
        """A public value as this party's share of it: party 0 holds it all."""
        enc = ring.encode(torch.as_tensor(value), self.frac)
        return enc if self.party == SERVER_RANK else torch.zeros_like(enc)

    def __add__(self, other: Any) -> "FssShare":
        if isinstance(other, FssShare):
            a, b, frac = self._aligned(other)
            out = self._new(a + b, frac)
            out.pending = self.pending or other.pending
            return out
        return self._new(self.data + self._public(other))

    __radd__ = __add__

    def __sub__(self, other: Any) -> "FssShare":
        if isinstance(other, FssShare):
            a, b, frac = self._aligned(other)
            out = self._new(a - b, frac)
            out.pending = self.pending or other.pending
            return out
        return self._new(self.data - self._public(other))

    def __neg__(self) -> "FssShare":
        return self._new(-self.data)

    def __mul__(self, public: Any) -> "FssShare":
        """Times a public value (a product of shares goes through the backend)."""
        if isinstance(public, FssShare):
            raise TypeError("a product of two shared values needs the backend (Backend.mul)")
        return self._new(ring.truncate(self.data * ring.encode(torch.as_tensor(public), self.frac), self.party, self.frac))

    __rmul__ = __mul__

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def nelement(self) -> int:
        return self.data.nelement()

    def reshape(self, *shape) -> "FssShare":
        return self._new(self.data.reshape(*shape))

    def flatten(self, start_dim: int = 0) -> "FssShare":
        return self._new(self.data.flatten(start_dim=start_dim))

    def index_select(self, dim: int, index: torch.Tensor) -> "FssShare":
        return self._new(self.data.index_select(dim, index))

    def permute(self, *dims: int) -> "FssShare":
        return self._new(self.data.permute(*dims))

    def sum(self, dim: int, keepdim: bool = False) -> "FssShare":
        return self._new(self.data.sum(dim=dim, keepdim=keepdim))

    def t(self) -> "FssShare":
        share = self._new(self.data.t())
        if self.constant is not None:
            share.constant = self.constant.transposed()
        return share


class _Constant:
    """What a session constant's products need: F = W - B (public), this party's B_i, and (the
    server's) F + B_0, each split into limbs once for the session, when first used (ring.Split)."""

    __slots__ = ("b_index", "f", "b", "fb", "is_transposed")

    def __init__(self, b_index: int, f: ring.Split, b: ring.Split, fb: ring.Split | None, is_transposed: bool = False) -> None:
        self.b_index, self.f, self.b, self.fb, self.is_transposed = b_index, f, b, fb, is_transposed

    def transposed(self) -> "_Constant":
        return _Constant(self.b_index, self.f, self.b, self.fb, not self.is_transposed)


class FssBackend(Backend):
    name = "fss"
    pricing = FssPricing()
    correlations = CORRELATIONS
    aes_seed = True
    narrow_comparisons = True  # a ReLU's DCF keys are made for the node's `bits`
    pool_pad_bits = 46  # _POOL_PAD
    fuses_truncation = True  # a product's exact truncation rides in its ReLU's opening (truncation.py)

    def __init__(self, rank: int, transport: PeerChannel, dealer: CorrelationSource, bits: int = 64, fraction_bits: int = DEFAULT_FRACTION_BITS) -> None:
        if dealer is None:
            raise BackendError("fss backend needs a dealer: it has no trusted-first-party mode")
        if not dealer.key:
            raise BackendError("fss backend got no AES seed from the dealer; is it serving the fss protocol for this session?")
        self.rank = rank
        self.transport = transport
        self.dealer = dealer
        self.bits = bits
        self.fraction_bits = check_fraction_bits(fraction_bits)
        self._pair: AesCtrPrg | None = None

    @classmethod
    def create(cls, rank: int, transport: PeerChannel, dealer: CorrelationSource | None, fraction_bits: int = DEFAULT_FRACTION_BITS) -> "FssBackend":
        return cls(rank, transport, dealer, fraction_bits=fraction_bits)

    def _wrap(self, data: torch.Tensor) -> FssShare:
        """This party's share `data` at the session's precision."""
        return FssShare(data, self.rank, frac=self.fraction_bits)

    # -- the wire ---------------------------------------------------------------------------------

    def _exchange(self, tag: str, mine: torch.Tensor) -> torch.Tensor:
        """Send my array (ring elements, or packed bits), receive the peer's of the same shape and type: one
        round (both send at once)."""
        self.transport.metrics.count_round()
        sent = mine.contiguous().numpy()
        self.transport.send(tag, sent)
        got = self.transport.recv(tag)
        if got.shape != sent.shape or got.dtype != sent.dtype:  # checked before torch reads it
            raise BackendError(
                f"fss backend got '{tag}' of shape {got.shape} and type {got.dtype} from its peer, expected {sent.shape} and {sent.dtype}"
            )
        return torch.from_numpy(got.copy())

    def _open(self, tag: str, mine: torch.Tensor) -> torch.Tensor:
        return mine + self._exchange(tag, mine)

    # -- lifecycle and sharing ----------------------------------------------------------------------

    def start(self) -> None:
        seed = os.urandom(16)
        theirs = self._exchange("fss.seed", torch.from_numpy(np.frombuffer(seed, dtype=np.int64).copy()))
        common = bytes(a ^ b for a, b in zip(seed, theirs.numpy().tobytes()))
        self._pair = AesCtrPrg(common)

    def share(self, value: torch.Tensor, src: int, *, constant: str | None = None) -> FssShare:
        draw = ring.from_numpy_u64(self._pair.uint64(tuple(value.shape))).reshape(value.shape)
        data = ring.encode(value, self.fraction_bits) - draw if self.rank == src else draw
        share = self._wrap(data)
        if constant is not None:
            share.constant = self._mask_constant(share)
        return share

    def _mask_constant(self, w: FssShare) -> _Constant:
        """Open W - B once for the session (B_i from this party's own stream)."""
        b_index = self.dealer.next_index()
        b = stream(self.dealer.key, b_index, _A, tuple(w.shape))
        f = self._open("fss.open_constant", w.data - b)
        return _Constant(b_index, ring.Split(f), ring.Split(b), ring.Split(f + b) if self.rank == SERVER_RANK else None)

    def reveal(self, x: FssShare, dst: int) -> torch.Tensor | None:
        self._settled(x, "the output")
        self.transport.metrics.count_round()
        if self.rank != dst:
            self.transport.send("fss.reveal", x.data.contiguous().numpy())
            return None
        theirs = torch.from_numpy(self.transport.recv("fss.reveal").copy()).reshape(x.shape)
        return ring.decode(x.data + theirs, self.fraction_bits)

    def cat(self, parts: list[FssShare], dim: int) -> FssShare:
        return self._wrap(torch.cat([p.data for p in parts], dim=dim))

    # -- products -----------------------------------------------------------------------------------

    def _beaver(self, op: str, x: FssShare, w: FssShare, attrs: dict[str, Any], truncation: Truncation) -> FssShare:
        self._settled(x, op)
        const = w.constant
        if const is None:
            return self._secret_product(op, x, w, truncation)
        if op == "matmul" and const.is_transposed:
            op = "linear"  # x W^T with W's own mask
        elif const.is_transposed:
            raise BackendError(f"fss backend: {op} of a transposed constant is not supported")
        index = self.dealer.next_index()
        a = stream(self.dealer.key, index, _A, tuple(x.shape))
        e = self._open("fss.beaver", x.data - a)
        f, b = const.f, const.b
        request = json.dumps({"op": op, "x_shape": list(x.shape), "w_shape": list(f.shape), "b_index": const.b_index, "attrs": attrs})
        if self.rank == SERVER_RANK:
            c = ring.from_numpy_u64(self.dealer.request(BEAVER, request, index)["c"])
            z = product(op, e, const.fb, attrs) + product(op, a, f, attrs) + c
        else:
            out = product(op, e, b, attrs) + product(op, a, f, attrs)
            z = out + stream(self.dealer.key, index, _C, tuple(out.shape))
        if truncation.fused:  # left at 2f bits to the ReLU that reads it, which truncates it exactly
            return FssShare(z, self.rank, frac=2 * self.fraction_bits, pending=truncation.bits)
        return self._truncate(z, 1 << self.fraction_bits, truncation)

    def _secret_product(self, op: str, x: FssShare, y: FssShare, truncation: Truncation) -> FssShare:
        """op(x, y) for two activations: X - A and Y - B opened in one round, A, B fresh streams of
        this correlation, the server's C_0 = op(A, B) - C_1 from the dealer."""
        self._settled(y, op)
        if op not in ("matmul", "mul"):
            raise BackendError(f"fss backend: {op} of two activations is not supported (matmul and mul are)")
        index = self.dealer.next_index()
        a = stream(self.dealer.key, index, _A, tuple(x.shape))
        b = stream(self.dealer.key, index, _B, tuple(y.shape))
        opened = self._open("fss.secret_product", torch.cat([(x.data - a).reshape(-1), (y.data - b).reshape(-1)]))
        e, f = opened[: x.nelement()].reshape(x.shape), opened[x.nelement() :].reshape(y.shape)
        z = product(op, e, b, {}) + product(op, a, f, {})
        if self.rank == SERVER_RANK:
            request = json.dumps({"op": op, "x_shape": list(x.shape), "y_shape": list(y.shape)})
            c = ring.from_numpy_u64(self.dealer.request(SECRET_PRODUCT, request, index)["c"]).reshape(z.shape)
            z = z + product(op, e, f, {}) + c
        else:
            z = z + stream(self.dealer.key, index, _C, tuple(z.shape))
        return self._truncate(z, 1 << self.fraction_bits, truncation)

    def _settled(self, x: FssShare, what: str) -> None:
        """A value whose exact truncation was left to a ReLU must reach that ReLU, nothing else."""
        if x.pending is not None or x.frac != self.fraction_bits:
            raise BackendError(f"fss backend: {what} got a product still awaiting its fused truncation; only a ReLU may read it")

    def _truncate(self, z: torch.Tensor, divisor: int, truncation: Truncation) -> FssShare:
        """This party's share of z / divisor: locally (SecureML), or exactly from the dealer's keys
        in one round (truncation.py), in chunks of at most KEY_CHUNK elements."""
        if not truncation.exact:
            return self._wrap(ring.divide(z, self.rank, divisor))
        n = z.nelement()
        if n == 0:
            return self._wrap(z)
        keys = [self._trunc_key(min(KEY_CHUNK, n - start), truncation.bits, divisor) for start in range(0, n, KEY_CHUNK)]
        mine = over_chunks(keys, ring.to_numpy_u64(z.reshape(-1)), trunc_masked_share)
        u = ring.to_numpy_u64(self._open("fss.trunc", ring.from_numpy_u64(mine)))
        out = over_chunks(keys, u, lambda key, chunk: trunc_eval(self.rank, key, chunk))
        return self._wrap(ring.from_numpy_u64(out).reshape(z.shape))

    def conv2d(self, x, w, *, stride, padding, dilation, groups, truncation=LOCAL):
        attrs = {"stride": list(stride), "padding": list(padding), "dilation": list(dilation), "groups": int(groups)}
        return self._beaver("conv2d", x, w, attrs, truncation)

    def matmul(self, x, w, truncation=LOCAL):
        return self._beaver("matmul", x, w, {}, truncation)

    def linear(self, x, w, truncation=LOCAL):
        return self._beaver("linear", x, w, {}, truncation)

    def mul(self, x, y, truncation=LOCAL):
        return self._beaver("mul", x, y, {}, truncation)

    def scale(self, x: FssShare, factor: torch.Tensor, truncation: Truncation = LOCAL) -> FssShare:
        self._settled(x, "a public factor")
        return self._truncate(x.data * ring.encode(torch.as_tensor(factor), self.fraction_bits), 1 << self.fraction_bits, truncation)

    def square(self, x: FssShare, truncation: Truncation = LOCAL) -> FssShare:
        self._settled(x, "a square")
        index, r = self._square_mask(x)
        return self._square_from(x, index, r, self._open("fss.square", x.data - r), truncation)

    def _square_mask(self, x: FssShare) -> tuple[int, torch.Tensor]:
        index = self.dealer.next_index()
        return index, stream(self.dealer.key, index, _A, tuple(x.shape))

    def _square_from(self, x: FssShare, index: int, r: torch.Tensor, e: torch.Tensor, truncation: Truncation) -> FssShare:
        """x^2 from the opened e = x - r: e^2 + 2 e r + r^2 (the server's share of r^2 from the dealer)."""
        shape = tuple(x.shape)
        if self.rank == SERVER_RANK:
            s = ring.from_numpy_u64(self.dealer.request(SQUARE, json.dumps({"shape": list(shape)}), index)["s"]).reshape(shape)
            z = e * e + 2 * e * r + s
        else:
            z = 2 * e * r + stream(self.dealer.key, index, _C, shape)
        return self._truncate(z, 1 << self.fraction_bits, truncation)

    # -- comparisons ------------------------------------------------------------------------------

    def relu(self, x: FssShare, bits: int | None = None) -> FssShare:
        """One round for the whole tensor; its keys come in chunks of at most KEY_CHUNK elements,
        so no single correlation (and no dealer buffer) grows with the layer."""
        if x.nelement() == 0:
            return self._wrap(x.data >> (x.frac - self.fraction_bits)) if x.pending is not None else x
        if x.pending is not None:
            return self._truncated_relu(x)
        self._settled(x, "a ReLU")
        keys, mine = self._relu_masked(x, bits)
        return self._relu_from(x, keys, self._open("fss.relu", mine))

    def _truncated_relu(self, x: FssShare) -> FssShare:
        """ReLU of a product's exact truncation in the one opening of the ReLU (truncation.py), the
        keys at the product's width: its fused truncation costs no round of its own."""
        n, shift = x.nelement(), x.frac - self.fraction_bits
        counts = [min(KEY_CHUNK, n - start) for start in range(0, n, KEY_CHUNK)]
        keys = [self._key(TRUNC_RELU, {"n": c, "bits": x.pending, "shift": shift}, TruncReluKey, c, x.pending) for c in counts]
        mine = over_chunks(keys, ring.to_numpy_u64(x.data.reshape(-1)), trunc_relu_masked_share)
        u = ring.to_numpy_u64(self._open("fss.trunc_relu", ring.from_numpy_u64(mine)))
        out = over_chunks(keys, u, lambda key, chunk: trunc_relu_eval(self.rank, key, chunk))
        return self._wrap(ring.from_numpy_u64(out).reshape(x.shape))

    def relu_and_square(
        self, x: FssShare, y: FssShare, bits: int | None = None, truncation: Truncation = LOCAL
    ) -> tuple[FssShare, FssShare]:
        """x + r and y - s go in one message: a masked site's comparisons and squares share a round."""
        if x.nelement() == 0 or y.nelement() == 0:
            return super().relu_and_square(x, y, bits, truncation)
        self._settled(x, "a ReLU")
        self._settled(y, "a square")
        keys, mine = self._relu_masked(x, bits)
        index, r = self._square_mask(y)
        opened = self._open("fss.relu_square", torch.cat([mine, (y.data - r).reshape(-1)]))
        n = x.nelement()
        return self._relu_from(x, keys, opened[:n]), self._square_from(y, index, r, opened[n:].reshape(y.shape), truncation)

    def _relu_masked(self, x: FssShare, bits: int | None) -> tuple[list[ReluKey], torch.Tensor]:
        """This party's keys for x (in chunks of at most KEY_CHUNK) and its share of x + r, flat."""
        n = x.nelement()
        bits = bits or self.bits
        keys = [self._relu_key(min(KEY_CHUNK, n - start), bits) for start in range(0, n, KEY_CHUNK)]
        return keys, ring.from_numpy_u64(over_chunks(keys, ring.to_numpy_u64(x.data.reshape(-1)), masked_share))

    def _relu_from(self, x: FssShare, keys: list[ReluKey], x_hat: torch.Tensor) -> FssShare:
        """ReLU(x) from the opened x + r: each chunk's DCF evaluated locally."""
        out = over_chunks(keys, ring.to_numpy_u64(x_hat), lambda key, chunk: relu_eval(self.rank, key, chunk))
        return self._wrap(ring.from_numpy_u64(out).reshape(x.shape))

    def _relu_key(self, n: int, bits: int) -> ReluKey:
        return self._key(RELU, {"n": n, "bits": bits}, ReluKey, n, bits)

    def _trunc_key(self, n: int, bits: int, divisor: int) -> TruncKey:
        key = self._key(TRUNC, {"n": n, "bits": bits, "divisor": divisor}, TruncKey, n, bits)
        if key.divisor != divisor:
            raise BackendError(f"fss backend got a truncation key dividing by {key.divisor}; it asked for {divisor}")
        return key

    def _key(self, kind: str, request: dict, key_type: type, n: int, bits: int) -> Any:
        """This party's key of `kind` for n elements at width `bits` (correlations.fetch_key)."""
        try:
            return fetch_key(self.dealer, kind, request, key_type, self.rank, n, bits)
        except BackendError as err:
            raise BackendError(f"fss backend {err}") from None

    def max_pool2d(self, x: FssShare, *, kernel, stride, padding, bits: int | None = None) -> FssShare:
        self._settled(x, "a max-pool")
        windows = self._windows(x, kernel, stride, padding, _POOL_PAD)  # (N, C, OH, OW, k)
        values = [windows[..., i] for i in range(windows.shape[-1])]
        while len(values) > 1:  # one ReLU call per level of the tree
            pairs = len(values) // 2
            a = torch.stack(values[0 : 2 * pairs : 2])
            b = torch.stack(values[1 : 2 * pairs : 2])
            r = self.relu(self._wrap(a - b), bits).data
            values = list(b + r) + values[2 * pairs :]
        return self._wrap(values[0].contiguous())

    def divide(self, x: FssShare, divisor: int, truncation: Truncation = LOCAL) -> FssShare:
        self._settled(x, "a division")
        return self._truncate(x.data, int(divisor), truncation)

    def avg_pool2d(self, x: FssShare, *, kernel, stride, padding, truncation: Truncation = LOCAL) -> FssShare:
        self._settled(x, "an average pool")
        windows = self._windows(x, kernel, stride, padding, 0)
        return self._truncate(windows.sum(dim=-1), int(np.prod(kernel)), truncation)

    def _windows(self, x: FssShare, kernel, stride, padding, pad_value: int) -> torch.Tensor:
        data = x.data
        ph, pw = padding
        if ph or pw:
            fill = pad_value if self.rank == SERVER_RANK else 0  # a public constant: party 0 holds it
            data = torch.nn.functional.pad(data, (pw, pw, ph, ph), value=fill)
        kh, kw = kernel
        sh, sw = stride
        w = data.unfold(2, kh, sh).unfold(3, kw, sw)  # (N, C, OH, OW, kh, kw)
        return w.reshape(*w.shape[:4], kh * kw)


class FssCompactBackend(FssBackend):
    """fss with two-round ReLUs from compact keys: under a fast link the dealer's bytes, not the
    rounds, are what a comparison costs."""

    name = "fss-compact"
    pricing = FssCompactPricing()
    correlations = COMPACT_CORRELATIONS

    def _relu_key(self, n: int, bits: int) -> SelectReluKey:
        return self._key(SELECT_RELU, {"n": n, "bits": bits}, SelectReluKey, n, bits)

    def _relu_from(self, x: FssShare, keys: list[SelectReluKey], x_hat: torch.Tensor) -> FssShare:
        """ReLU(x) from the opened x + r: each chunk's comparison, then the layer's bits opened in
        one more round, then each chunk's select."""
        xh = ring.to_numpy_u64(x_hat)
        mine = over_chunks(keys, xh, lambda key, chunk: select_bits(self.rank, key, chunk))
        packed = torch.from_numpy(np.packbits(mine))
        d_hat = np.unpackbits((packed ^ self._exchange("fss.select", packed)).numpy(), count=mine.size)
        both = np.stack([xh, d_hat.astype(np.uint64)], axis=1)
        out = over_chunks(keys, both, lambda key, chunk: select_relu_eval(self.rank, key, chunk[:, 0], chunk[:, 1]))
        return self._wrap(ring.from_numpy_u64(out).reshape(x.shape))
