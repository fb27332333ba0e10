"""Running statistics evaluated at the current conv weights (compensated running statistics).

BN's running mean/var are an exponential moving average (EMA) of batch statistics, each taken at the
weights of its own iteration. At small batch they lag the weights. With the derivatives CBN already
computes, the same EMA can be evaluated at the *current* weights ``(W, b)`` of the producing conv::

    mean(W) = R_mean + sum_t a_t (<p_t, W - W_t> + b - b_t)          (exact: the mean is linear)
            = R_mean + <P, W> + b * A - E_mean
    var(W)  = R_var + sum_t a_t <g_t, W - W_t>                         (first order)
            = R_var + <Gv, W> - E_var

with ``a_t`` the EMA's weights, ``p_t`` the patch mean (``d mean / dW``) and ``g_t`` the derivative of
the unbiased batch variance (``n/(n-1) * (d sqmean/dW - 2 mean_t p_t)``, centred, so it carries no
``mean^2`` cancellation). :class:`RunningDrift` keeps the EMAs ``P``, ``Gv``, ``A`` (of 1), ``E_mean``
(of ``<p_t, W_t> + b_t``) and ``E_var`` (of ``<g_t, W_t>``): one weight-sized tensor and a few
per-channel vectors per layer. ``R`` itself stays the layer's ordinary ``running_mean``/``running_var``.

Writing the compensated value back into ``R`` (:meth:`RunningDrift.rebase` after the caller's
export) leaves ``mean(W)``/``var(W)`` unchanged for every ``W``, so exporting is idempotent.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .scratch_tensors import ScratchTensors


class RunningDrift(ScratchTensors):
    """EMAs of the per-iteration derivative terms of one layer's running statistics."""
    tensor_names = ('patch_mean', 'var_grad', 'bias_weight', 'mean_at_own', 'var_at_own')

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forgets every tracked iteration (the running statistics then count as current)."""
        self.patch_mean: Optional[Tensor] = None  # [groups, K]
        self.var_grad: Optional[Tensor] = None  # [C, K]
        self.bias_weight: Optional[Tensor] = None  # [] EMA of 1: the weight of b in the mean
        self.mean_at_own: Optional[Tensor] = None  # [C] EMA of <p_t, W_t> + b_t
        self.var_at_own: Optional[Tensor] = None  # [C] EMA of <g_t, W_t>

    @property
    def empty(self) -> bool:
        return self.var_grad is None

    @staticmethod
    def _flat(weight: Tensor, dtype) -> Tensor:
        return weight.detach().to(dtype).reshape(weight.shape[0], -1)

    @staticmethod
    def _mean_term(patch_mean: Tensor, w: Tensor) -> Tensor:
        """``<p_group(c), W_c>`` for every channel ``c``: ``[C]``."""
        groups, k = patch_mean.shape
        per_group = w.reshape(groups, -1, k) @ patch_mean.unsqueeze(-1)  # [g, C/g, 1]
        return per_group.reshape(-1)

    @torch.no_grad()
    def update(self, patch_mean: Tensor, sqmean_grad: Tensor, weight: Tensor,
               bias: Optional[Tensor], num_positions: int, factor: float, finite: Tensor) -> None:
        """Adds one batch with the EMA factor the running statistics used for it.

        Args:
            patch_mean, sqmean_grad: the batch's derivatives (``moment_derivatives``), taken at
                ``weight``/``bias``, the conv's parameters in this forward.
            num_positions: positions the batch's variance was taken over (for ``n / (n - 1)``).
            factor: the weight of the new batch (``momentum``, or ``1 / n`` for a cumulative mean).
            finite: a bool tensor; False leaves everything as it is (as for the running stats).
        """
        dtype = sqmean_grad.dtype
        w = self._flat(weight, dtype)
        channels, groups = w.shape[0], patch_mean.shape[0]
        mean = self._mean_term(patch_mean, w)
        if bias is not None:
            mean = mean + bias.detach().to(dtype)
        unbiased = num_positions / (num_positions - 1) if num_positions > 1 else 1.0
        # var_grad = unbiased * (sqmean_grad - 2 mean_c p_group(c)): one fused pass over [C, K]
        per_group = channels // groups
        var_grad = torch.baddbmm(sqmean_grad.reshape(groups, per_group, -1),
                                 mean.reshape(groups, per_group, 1), patch_mean.unsqueeze(1),
                                 beta=unbiased, alpha=-2.0 * unbiased).reshape(channels, -1)
        var_at_own = torch.bmm(var_grad.unsqueeze(1), w.unsqueeze(2)).reshape(channels)
        if self.empty or self.var_grad.shape != var_grad.shape:
            self.patch_mean = torch.zeros_like(patch_mean)
            self.var_grad = torch.zeros_like(var_grad)
            self.bias_weight = torch.zeros((), dtype=dtype, device=w.device)
            self.mean_at_own = torch.zeros_like(mean)
            self.var_at_own = torch.zeros_like(mean)
        # a non-finite batch leaves the EMAs as they are (a where: no host sync on the flag);
        # var_grad is ours, so the largest one is masked in place
        self.var_grad.lerp_(torch.where(finite, var_grad, self.var_grad, out=var_grad), factor)
        for ema, new in ((self.patch_mean, patch_mean),
                         (self.bias_weight, torch.ones_like(self.bias_weight)),
                         (self.mean_at_own, mean), (self.var_at_own, var_at_own)):
            ema.lerp_(torch.where(finite, new, ema), factor)

    @torch.no_grad()
    def delta(self, weight: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """How much the running mean and variance move when evaluated at ``weight``/``bias``."""
        w = self._flat(weight, self.var_grad.dtype)
        d_mean = self._mean_term(self.patch_mean, w) - self.mean_at_own
        if bias is not None:
            d_mean = d_mean + self.bias_weight * bias.detach().to(w.dtype)
        d_var = (self.var_grad * w).sum(1) - self.var_at_own
        return d_mean, d_var

    @torch.no_grad()
    def rebase(self, weight: Tensor, bias: Optional[Tensor]) -> None:
        """Makes :meth:`delta` zero at ``weight``/``bias``: call after writing the compensated
        statistics at these parameters into the running statistics."""
        d_mean, d_var = self.delta(weight, bias)
        self.mean_at_own += d_mean
        self.var_at_own += d_var
