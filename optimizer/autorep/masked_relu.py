"""AutoReP's activation site: a learned per-element ReLU mask and a DaPa polynomial elsewhere.

One module per ReLU site (never one instance indexed by call order). Forward:

    out = m * relu(x) + (1 - m) * (c0 + c1 x + c2 x^2)      (coefficients per channel)

`m` is binary; `aux` learns it through a straight-through estimator whose backward scales the
gradient by softplus(aux), and a hysteresis threshold stops masks flickering. The polynomial
starts as the least-squares fit of ReLU under each channel's Gaussian statistics (DaPa).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from twinfer.protocols.ops.activation import ActivationSite


class _SoftplusSTE(torch.autograd.Function):
    """Forward: the binary mask. Backward: the mask's gradient times softplus(aux), to aux."""

    @staticmethod
    def forward(ctx, aux: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(aux)
        return mask.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (aux,) = ctx.saved_tensors
        return grad * F.softplus(aux), None


def ste_mask(aux: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _SoftplusSTE.apply(aux, mask)


def hysteresis(mask: torch.Tensor, aux: torch.Tensor, threshold: float) -> torch.Tensor:
    """A kept position drops only below -t; a dropped one returns only above +t."""
    keep = (aux > -threshold).to(mask.dtype)
    revive = (aux > threshold).to(mask.dtype)
    return mask * keep + (1 - mask) * revive


def _gaussian_moments(mu: torch.Tensor, sigma: torch.Tensor) -> list[torch.Tensor]:
    """E[x^k] for k = 0..4 under N(mu, sigma^2)."""
    s2 = sigma**2
    return [torch.ones_like(mu), mu, mu**2 + s2, mu**3 + 3 * mu * s2, mu**4 + 6 * mu**2 * s2 + 3 * s2**2]


def _relu_moments(mu: torch.Tensor, sigma: torch.Tensor) -> list[torch.Tensor]:
    """E[x^k relu(x)] = E[x^(k+1) 1{x>0}] for k = 0..2 under N(mu, sigma^2)."""
    a = mu / sigma
    pdf = torch.exp(-0.5 * a**2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + torch.erf(a / math.sqrt(2)))
    # Partial moments of z ~ N(0,1) over z > -a: E[z^j 1{z > -a}], j = 0..3.
    z = [cdf, pdf, cdf - a * pdf, (a**2 + 2) * pdf]
    out = []
    for k in (1, 2, 3):  # x^k with x = mu + sigma z, binomial expansion
        out.append(sum(math.comb(k, j) * mu ** (k - j) * sigma**j * z[j] for j in range(k + 1)))
    return out


def dapa_coefficients(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Least-squares quadratic fit of ReLU under N(mean, std^2), per channel: (C, 3) = c0, c1, c2.

    Takes the standard deviation (AutoReP's public code passes the variance here).
    """
    mean = mean.double()
    std = std.double().clamp_min(1e-4)
    m = _gaussian_moments(mean, std)
    b = _relu_moments(mean, std)
    gram = torch.stack([torch.stack([m[i + j] for j in range(3)], -1) for i in range(3)], -2)  # (C, 3, 3)
    rhs = torch.stack(b, -1).unsqueeze(-1)
    return torch.linalg.solve(gram, rhs).squeeze(-1).float()


class MaskedReLU(nn.Module):
    """One ReLU site with a learned mask over C x H x W and a per-channel polynomial.

    With granularity "channel" the mask has one entry per channel (a coarse baseline).
    """

    def __init__(self, threshold: float = 0.002, c2_max: float = 1.0, momentum: float = 0.1, granularity: str = "element") -> None:
        super().__init__()
        if granularity not in ("element", "channel"):
            raise ValueError(f"granularity must be 'element' or 'channel', got {granularity!r}")
        self.granularity = granularity
        self.frozen = False  # a frozen mask no longer follows aux
        self.polynomial_only = False  # the whole site a polynomial: its mask stays zero, whatever the phase
        self.threshold = threshold
        self.c2_max = c2_max
        self.momentum = momentum
        self.export_as_relu = False
        self.refit = True  # refit the polynomial from running statistics (early training)
        self.aux: nn.Parameter | None = None
        self.coeffs: nn.Parameter | None = None

    def materialize(self, x: torch.Tensor) -> None:
        """Create mask, aux, statistics and coefficients for this site's activation shape."""
        shape, channels = tuple(x.shape[1:]), int(x.shape[1])
        self.site_shape = shape
        if self.granularity == "channel":
            shape = (channels,) + (1,) * (len(shape) - 1)
        self.aux = nn.Parameter(torch.rand(shape, device=x.device))
        self.register_buffer("mask", torch.ones(shape, device=x.device))
        self.register_buffer("running_mean", torch.zeros(channels, device=x.device))
        self.register_buffer("running_var", torch.ones(channels, device=x.device))
        self.coeffs = nn.Parameter(dapa_coefficients(self.running_mean, self.running_var.sqrt()))

    def _channel_view(self, x: torch.Tensor) -> tuple[int, ...]:
        return (1, -1) + (1,) * (x.dim() - 2)

    def _update_statistics(self, x: torch.Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        with torch.no_grad():
            self.running_mean.lerp_(x.mean(dims), self.momentum)
            self.running_var.lerp_(x.var(dims), self.momentum)
            if self.refit:
                self.coeffs.copy_(dapa_coefficients(self.running_mean, self.running_var.sqrt()))
            self.coeffs[:, 2].clamp_(-self.c2_max, self.c2_max)

    def polynomial(self, x: torch.Tensor) -> torch.Tensor:
        view = self._channel_view(x)
        c = self.coeffs
        c2 = c[:, 2].clamp(-self.c2_max, self.c2_max)
        return c[:, 0].view(view) + c[:, 1].view(view) * x + c2.view(view) * x * x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.export_as_relu:
            return F.relu(x)
        if self.aux is None:
            self.materialize(x)
        if self.training:
            self._update_statistics(x)
        if self.training and not self.frozen:
            with torch.no_grad():
                self.mask.copy_(hysteresis(self.mask, self.aux, self.threshold))
            m = ste_mask(self.aux, self.mask)
        else:
            m = self.mask
        return m * F.relu(x) + (1 - m) * self.polynomial(x)

    def density_term(self) -> torch.Tensor:
        """Kept elements as a differentiable sum (through the STE)."""
        return ste_mask(self.aux, self.mask).sum() * self._per_mask_entry()

    def _per_mask_entry(self) -> int:
        return int(np.prod(self.site_shape)) // self.mask.numel()

    def full_mask(self) -> torch.Tensor:
        """The mask over the whole activation (channel masks broadcast)."""
        return self.mask.expand(self.site_shape)

    def kept(self) -> int:
        return int(self.mask.sum().item()) * self._per_mask_entry() if self.aux is not None else 0

    def elements(self) -> int:
        return int(np.prod(self.site_shape)) if self.aux is not None else 0

    def site(self) -> ActivationSite:
        c = self.coeffs.detach().clone()
        c[:, 2].clamp_(-self.c2_max, self.c2_max)
        mask = self.full_mask().detach().cpu().numpy() > 0.5
        return ActivationSite(mask=mask, coeffs=c.cpu().numpy().astype(np.float32))
