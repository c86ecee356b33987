"""The `crypten` backend: CrypTen's MPCTensor protocols over twinfer's transport and dealer.

The party builds it with its communicator (`communicator.TransportCommunicator` over the
session's transport) and its dealer client (or None for CrypTen's insecure trusted first
party); `start` binds both to the calling thread (`patches.bind_session`) and initialises
CrypTen, `stop` undoes it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from ..base import DEFAULT_FRACTION_BITS, LOCAL, Backend, BackendError, Truncation, check_fraction_bits
from ..channels import CorrelationSource, PeerChannel
from ..fss.correlations import TRUNC, fetch_key
from ..fss.dcf import over_chunks
from ..fss.pricing import KEY_CHUNK
from ..fss.truncation import TruncKey, trunc_eval, trunc_masked_share
from . import correlations, patches
from .pricing import CryptenPricing


class CryptenBackend(Backend):
    name = "crypten"
    trusted_first_party = True  # CrypTen's TFP provider
    pricing = CryptenPricing()
    correlations = correlations.CORRELATIONS
    pool_pad_bits = 24  # CrypTen pads max-pool windows with -2^24 ring units (common/functions/pooling.py)
    public_rounding = "toward_zero"  # CrypTen's encoder: int(x 2^f)

    def __init__(self, rank: int, communicator: Any, dealer: CorrelationSource | None, fraction_bits: int = DEFAULT_FRACTION_BITS) -> None:
        self.rank = rank
        self._communicator = communicator
        self._dealer = dealer
        self.fraction_bits = check_fraction_bits(fraction_bits)
        self._crypten = None
        self._attached = False
        self._constants: dict[int, tuple] = {}  # id(shared constant) -> (it, B's index, B_i, W - B)

    @classmethod
    def prepare(cls) -> None:
        patches.load_crypten()

    @classmethod
    def create(cls, rank: int, transport: PeerChannel, dealer: CorrelationSource | None, fraction_bits: int = DEFAULT_FRACTION_BITS) -> "CryptenBackend":
        cls.prepare()
        from .communicator import TransportCommunicator  # subclasses CrypTen's, so only once loaded

        return cls(rank, TransportCommunicator(transport, rank), dealer, fraction_bits)

    @classmethod
    def attach(cls, rank: int) -> "CryptenBackend":
        """A backend over a CrypTen the caller initialised itself (stock CrypTen over gloo, the
        baseline of benchmarks/transport_vs_gloo.py); start and stop do nothing then."""
        backend = cls(rank, None, None)
        backend._crypten = patches.load_crypten()
        backend._attached = True
        return backend

    def start(self) -> None:
        crypten = patches.load_crypten()
        patches.bind_session(self._communicator, self._dealer, precision_bits=self.fraction_bits)
        crypten.cfg.communicator.verbose = True
        crypten.init()
        self._crypten = crypten

    def stop(self) -> None:
        if self._crypten is not None and not self._attached:
            patches.unbind_session()
            self._crypten = None

    def reset_stats(self) -> None:
        self._communicator.reset_communication_stats()

    def stats(self) -> dict[str, float]:
        return dict(self._communicator.get_communication_stats())

    def share(self, value: torch.Tensor, src: int, *, constant: str | None = None) -> Any:
        # CrypTen's encoder cuts x * 2^f toward zero, an error of the same sign for every weight of
        # one sign; rounded to the grid first (exactly, in float64), the encoding rounds to nearest.
        scale = float(1 << self.fraction_bits)
        x = self._crypten.cryptensor(torch.round(value.to(torch.float64) * scale) / scale, src=src)
        if constant is not None and self._dealer is not None:
            # A session constant gets its own Beaver mask B now; W - B is opened once, here.
            b_index = self._dealer.next_index()
            b = correlations.fixed_b_draws(self._dealer.generator(b_index), tuple(x.size()))
            delta = self._communicator.all_reduce(x._tensor.share - b)
            self._constants[id(x)] = (x, b_index, b, delta)
        return x

    def _fixed_b_product(self, op: str, x: Any, w: Any, truncation: Truncation, **kwargs) -> Any | None:
        """Beaver (1991) with the constant's mask fixed for the session: open only E = X - A.

        Party i holds c_i + op(E, B_i) + op(A_i, D), and party 0 also op(E, D), with D = W - B
        opened at sharing; the product is then divided by the scale as CrypTen divides its own.
        None when `w` is not a session constant (or there is no dealer): the caller uses CrypTen's.
        """
        entry = self._constants.get(id(w))
        if entry is None or entry[0] is not w:
            return None
        _, b_index, b, delta = entry
        index = self._dealer.next_index()
        g = self._dealer.generator(index)
        xs = x._tensor
        a = correlations.fixed_b_draws(g, tuple(xs.share.shape))
        if self.rank == 0:
            request = json.dumps({"op": op, "x_size": list(xs.share.shape), "w_size": list(b.shape), "b_index": b_index, "kwargs": kwargs})
            c = torch.from_numpy(self._dealer.request(correlations.FIXED_B, request, index)["share"].copy())
        else:
            c = correlations.fixed_b_draws(g, correlations.product_shape(op, a.shape, b.shape, kwargs))
        e = self._communicator.all_reduce(xs.share - a)
        z = c + correlations.ring_product(op, e, b, kwargs) + correlations.ring_product(op, a, delta, kwargs)
        if self.rank == 0:
            z = z + correlations.ring_product(op, e, delta, kwargs)
        result = xs.clone()
        result.share = z
        out = x.clone()
        out._tensor = self._truncate(result, result.encoder.scale, truncation)
        return out

    def _truncate(self, value: Any, divisor: int, truncation: Truncation) -> Any:
        """An ArithmeticSharedTensor divided by a public integer: CrypTen's local division (each
        share divided, toward zero), or exactly: the fss backend's protocol (fss/truncation.py)
        on this party's share, its masked value opened in one exchange, keys from the dealer."""
        if not truncation.exact:
            return value.div_(divisor)
        share = value.share
        n = share.nelement()
        if n:
            keys = [self._trunc_key(min(KEY_CHUNK, n - start), truncation.bits, divisor) for start in range(0, n, KEY_CHUNK)]
            mine = over_chunks(keys, share.reshape(-1).contiguous().numpy().view(np.uint64), trunc_masked_share)
            u = self._communicator.all_reduce(torch.from_numpy(mine.view(np.int64))).numpy().view(np.uint64)
            out = over_chunks(keys, u, lambda key, chunk: trunc_eval(self.rank, key, chunk))
            value.share = torch.from_numpy(out.view(np.int64)).reshape(share.shape)
        return value

    def _trunc_key(self, n: int, bits: int, divisor: int) -> TruncKey:
        try:
            key = fetch_key(self._dealer, TRUNC, {"n": n, "bits": bits, "divisor": divisor}, TruncKey, self.rank, n, bits)
        except BackendError as err:
            raise BackendError(f"crypten backend {err}") from None
        if key.divisor != divisor:
            raise BackendError(f"crypten backend got a truncation key dividing by {key.divisor}; it asked for {divisor}")
        return key

    def _local_only(self, truncation: Truncation, what: str) -> None:
        if truncation.exact and self._dealer is None:
            raise BackendError(f"crypten backend: {what} asks for an exact truncation, which needs a dealer (not the trusted first party)")

    def reveal(self, x: Any, dst: int) -> torch.Tensor | None:
        # The ring elements, decoded here: CrypTen's decoder misreads some negative values, by
        # a whole unit (e.g. -511 / 2^8 decodes as -2.996 instead of -1.996).
        ring = x.reveal(dst=dst)
        return None if ring is None else (ring.to(torch.float64) / float(x.encoder.scale)).to(torch.float32)

    def cat(self, parts: list[Any], dim: int) -> Any:
        return self._crypten.cat(parts, dim=dim)

    def conv2d(self, x, w, *, stride, padding, dilation, groups, truncation=LOCAL):
        kwargs = {"stride": list(stride), "padding": list(padding), "dilation": list(dilation), "groups": int(groups)}
        fixed = self._fixed_b_product("conv2d", x, w, truncation, **kwargs)
        self._local_only(truncation, "a convolution")
        return fixed if fixed is not None else x.conv2d(w, stride=stride, padding=padding, dilation=dilation, groups=groups)

    def linear(self, x, w, truncation=LOCAL):
        fixed = self._fixed_b_product("linear", x, w, truncation)
        self._local_only(truncation, "a linear layer")
        return fixed if fixed is not None else x.matmul(w.t())

    def matmul(self, x, w, truncation=LOCAL):
        fixed = self._fixed_b_product("matmul", x, w, truncation)
        self._local_only(truncation, "a product")
        return fixed if fixed is not None else self._secret_product("matmul", x, w, truncation)

    def mul(self, x, y, truncation=LOCAL):
        fixed = self._fixed_b_product("mul", x, y, truncation)
        self._local_only(truncation, "a product")
        return fixed if fixed is not None else self._secret_product("mul", x, y, truncation)

    def _secret_product(self, op: str, x: Any, y: Any, truncation: Truncation) -> Any:
        """A product of two activations: CrypTen's Beaver product, truncated as `truncation` says."""
        if not truncation.exact:
            return x.matmul(y) if op == "matmul" else x * y
        from crypten.mpc.primitives import beaver  # CrypTen's Beaver product, before its local division

        product = getattr(beaver, op)(x._tensor, y._tensor)
        product.encoder = x._tensor.encoder  # it comes out unscaled (scale 1); its value carries 2f bits
        out = x.clone()
        out._tensor = self._truncate(product, x._tensor.encoder.scale, truncation)
        return out

    def square(self, x, truncation=LOCAL):
        if not truncation.exact:
            return x.square()
        self._local_only(truncation, "a square")
        from crypten.mpc.primitives import beaver  # CrypTen's Beaver square, before its local division

        square = beaver.square(x._tensor)
        square.encoder = x._tensor.encoder  # CrypTen's square comes out unscaled (scale 1); its value carries 2f bits
        out = x.clone()
        out._tensor = self._truncate(square, x._tensor.encoder.scale, truncation)
        return out

    def scale(self, x, factor, truncation=LOCAL):
        if not truncation.exact:
            return x * factor  # CrypTen encodes the factor (toward zero) and divides locally
        self._local_only(truncation, "a public factor")
        tensor = x._tensor
        product = tensor.clone()
        product.share = tensor.share * tensor.encoder.encode(torch.as_tensor(factor))
        out = x.clone()
        out._tensor = self._truncate(product, tensor.encoder.scale, truncation)
        return out

    def relu(self, x, bits=None):
        return x.relu()  # CrypTen compares on the full 64-bit ring: a narrower width changes nothing

    def max_pool2d(self, x, *, kernel, stride, padding, bits=None):
        return x.max_pool2d(kernel, padding=padding, stride=stride)

    def divide(self, x, divisor, truncation=LOCAL):
        self._local_only(truncation, "a division")
        out = x.clone()
        out._tensor = self._truncate(x._tensor.clone(), int(divisor), truncation)
        return out

    def avg_pool2d(self, x, *, kernel, stride, padding, truncation=LOCAL):
        if not truncation.exact:
            return x.avg_pool2d(kernel, stride=stride, padding=padding)
        self._local_only(truncation, "an average pool")
        tensor = x._tensor
        sums = tensor.clone()  # the window sums of this party's share (local), then one exact division
        data = torch.nn.functional.pad(tensor.share, (padding[1], padding[1], padding[0], padding[0]))
        windows = data.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])
        sums.share = windows.reshape(*windows.shape[:4], -1).sum(dim=-1)
        out = x.clone()
        out._tensor = self._truncate(sums, int(np.prod(kernel)), truncation)
        return out
