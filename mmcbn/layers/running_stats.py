"""A CBN layer's running statistics: BN's EMA update, and the EMA evaluated at the current conv
weights (compensated running statistics).

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

The layer writes ``mean(W)``/``var(W)`` into ``R`` after every optimizer step that changed its conv
(:mod:`~mmcbn.layers.optimizer_steps`; :func:`move_running_stats`, for every layer at once, then
rebases, which leaves ``mean(W')``/``var(W')`` unchanged for every ``W'``), so the buffers every
reader sees (eval, a state dict, a converter, an EMA of the model) always hold the statistics at
the current weights.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .binding import parameter_versions
from .conv_moments import channel_dots
from .scratch_tensors import ScratchTensors


def unbiased(var: Tensor, num_positions) -> Tensor:
    """``var * n / (n - 1)`` for ``n = num_positions`` (an int, or a tensor kept on the device)."""
    n = num_positions
    if isinstance(n, Tensor):
        return var * torch.where(n > 1, n / (n - 1).clamp_min(1.0), 1.0)
    return var * (n / (n - 1) if n > 1 else 1.0)


@torch.no_grad()
def update_running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                         num_positions, factor, finite: Tensor) -> None:
    """BN's update: ``running_* += factor * (batch - running_*)``, the variance unbiased with the
    ``num_positions`` (an int or a tensor) it was taken over; a non-finite batch (``finite``
    False) leaves both as they are. No host sync."""
    targets = [torch.where(finite, mean, running_mean),
               torch.where(finite, unbiased(var, num_positions), running_var)]
    _lerp([running_mean, running_var], targets, factor)


def _lerp(tensors, targets, factor) -> None:
    """``t += factor * (target - t)`` for every pair, in one op; ``factor`` a Python number or a
    0-dim tensor kept on the device (a cumulative average's 1 / count: one weight per pair, as a
    tensor weight alone would be read back to the host)."""
    torch._foreach_lerp_(tensors, targets,
                         [factor] * len(tensors) if isinstance(factor, Tensor) else factor)


class RunningDrift(ScratchTensors):
    """EMAs of the per-iteration derivative terms of one layer's running statistics.

    All five live in one flat tensor (``patch_mean`` ``[groups, K]``, ``half_var_grad`` ``[C, K]``,
    ``bias_weight`` ``[]``, ``mean_at_own`` ``[C]``, ``half_var_at_own`` ``[C]``, each a view of
    it), so that a step's update, running statistics included, is one masked blend and one
    ``lerp`` whatever the conv's shape. The variance's terms are kept halved: at the weights of
    its own batch, ``<g_t, W_t> / 2`` is the unbiased batch variance (plus half the sampled
    derivative's excess), which the running variance's update already holds.
    """
    tensor_names = ('state', 'one')

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Forgets every tracked iteration (the running statistics then count as current)."""
        self.state: Optional[Tensor] = None
        self.one: Optional[Tensor] = None  # [1] the EMA's weight of the bias, for one batch
        self._factors = {}  # Python EMA factors as 0-dim tensors (see _factor_tensor)
        #: the bound parameters' version counters where the drift is zero (see :meth:`stale`)
        self.versions: Optional[Tuple[int, int]] = None
        self._shape: Optional[Tuple[int, int, int]] = None  # (groups, C, K)

    @property
    def empty(self) -> bool:
        return self.state is None

    def _views(self, flat: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``patch_mean``, ``half_var_grad``, ``bias_weight``, ``mean_at_own``, ``half_var_at_own``
        of a flat tensor laid out as :attr:`state`."""
        groups, channels, k = self._shape
        sizes = (groups * k, channels * k, 1, channels, channels)
        pm, vg, bw, mo, vo = flat.split(sizes)
        return pm.view(groups, k), vg.view(channels, k), bw.view(()), mo, vo

    patch_mean = property(lambda self: self._view(0), doc='``[groups, K]`` EMA of the patch means')
    half_var_grad = property(lambda self: self._view(1),
                             doc='``[C, K]`` EMA of half the unbiased variance\'s derivatives')
    bias_weight = property(lambda self: self._view(2), doc='``[]`` EMA of 1 (the weight of b)')
    mean_at_own = property(lambda self: self._view(3), doc='``[C]`` EMA of <p_t, W_t> + b_t')
    half_var_at_own = property(lambda self: self._view(4), doc='``[C]`` EMA of <g_t, W_t> / 2')

    def _view(self, index: int) -> Optional[Tensor]:
        return None if self.empty else self._views(self.state)[index]

    @staticmethod
    def _flat(weight: Tensor, dtype) -> Tensor:
        return weight.detach().to(dtype).reshape(weight.shape[0], -1)

    @staticmethod
    def _mean_term(patch_mean: Tensor, w: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """``<p_group(c), W_c>`` for every channel ``c``: ``[C]``."""
        groups, k = patch_mean.shape
        per_group = torch.matmul(w.reshape(groups, -1, k), patch_mean.unsqueeze(-1),
                                 out=None if out is None else out.view(groups, -1, 1))
        return per_group.reshape(-1)

    @torch.no_grad()
    def update(self, patch_mean: Tensor, sqmean_grad: Tensor, excess: Optional[Tensor],
               mean: Tensor, var: Tensor, weight: Tensor, bias: Optional[Tensor],
               num_positions: int, factor, finite: Tensor, running: Optional[tuple] = None) -> None:
        """Adds one batch with the EMA factor the running statistics used for it.

        The batch's own terms come from its moments, not from products with the weights: at the
        weights they were taken at, ``<p_t, W_t> + b_t`` is the batch mean exactly and
        ``<g_t, W_t> / 2`` is ``n/(n-1) * (var + excess / 2)`` (Euler's identity, with the sampled
        derivative's :func:`~mmcbn.layers.conv_moments.identity_excess`, so that its noise cancels
        at these weights).

        Args:
            patch_mean, sqmean_grad, excess: the batch's derivatives (``moment_derivatives``;
                ``excess`` None for an exact one), taken at ``weight``/``bias``, the conv's
                parameters in this forward.
            mean, var: the batch's (biased) moments, ``[C]``.
            num_positions: positions the batch's variance was taken over (for ``n / (n - 1)``).
            factor: the weight of the new batch (``momentum``, or ``1 / n`` for a cumulative mean,
                a tensor).
            finite: a bool tensor; False leaves everything as it is (as for the running stats).
            running: ``(running_mean, running_var, mean, var, num_positions)``: BN's update of the
                running statistics from these moments (pooled over processes under synchronised
                CBN), made in the same blend.
        """
        dtype = sqmean_grad.dtype
        channels, k = sqmean_grad.shape
        groups = patch_mean.shape[0]
        if self.empty or self._shape != (groups, channels, k) or self.state.dtype != dtype:
            self._shape = (groups, channels, k)
            self.state = torch.zeros(groups * k + channels * k + 1 + 2 * channels, dtype=dtype,
                                     device=sqmean_grad.device)
            self.one = torch.ones(1, dtype=dtype, device=sqmean_grad.device)
        factor_n = num_positions / (num_positions - 1) if num_positions > 1 else 1.0
        # half_var_grad = n/(n-1) * (sqmean_grad / 2 - mean_c p_group(c)): one pass over [C, K]
        per_group = channels // groups
        mean, var = mean.to(dtype), var.to(dtype)
        half_var_grad = torch.baddbmm(sqmean_grad.reshape(groups, per_group, k),
                                      mean.view(groups, per_group, 1), patch_mean.unsqueeze(1),
                                      beta=0.5 * factor_n, alpha=-factor_n)
        unbiased_var = var.mul(factor_n)
        half_var_at_own = unbiased_var if excess is None else \
            torch.add(unbiased_var, excess, alpha=0.5 * factor_n)
        new = [patch_mean.reshape(-1), half_var_grad.reshape(-1), self.one, mean, half_var_at_own]
        tensors = [self.state]
        if running is not None:
            running_mean, running_var, r_mean, r_var, r_positions = running
            if running_mean.dtype != dtype:  # a half-precision module: BN's update on its own
                update_running_stats(*running, factor, finite)
            else:
                tensors = [running_mean, running_var, self.state]
                r_var = unbiased_var if r_var is var and r_positions == num_positions else \
                    unbiased(r_var.to(dtype), r_positions)
                new = [r_mean.to(dtype), r_var] + new
        # a non-finite batch leaves everything as it is: its blend weight is 0 and its NaN/inf
        # zeroed (the flag multiplies the weight, not the weight-sized target: no host sync)
        target = torch.cat(new).nan_to_num_(0.0, 0.0, 0.0)
        blend = self._factor_tensor(factor) * finite
        _lerp(tensors, [t_new.view_as(t) for t, t_new in zip(tensors, target.split(
            [t.numel() for t in tensors]))], blend)
        self.versions = parameter_versions(weight, bias)  # a batch at the current weights adds no drift

    def _factor_tensor(self, factor) -> Tensor:
        """``factor`` as a 0-dim tensor of the drift's dtype and device (a Python factor's made
        once and kept)."""
        if isinstance(factor, Tensor):
            return factor.to(self.state.dtype)
        kept = self._factors.get(factor)
        if kept is None or kept.device != self.state.device or kept.dtype != self.state.dtype:
            kept = self._factors[factor] = torch.full((), factor, dtype=self.state.dtype,
                                                      device=self.state.device)
        return kept

    def stale(self, weight: Tensor, bias: Optional[Tensor]) -> bool:
        """Whether ``weight``/``bias`` changed in place since the drift was last zero at them (their
        version counters, read on the host: no device sync)."""
        return not self.empty and self.versions != parameter_versions(weight, bias)

    @torch.no_grad()
    def moved_terms(self, weight: Tensor, bias: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """The drift's terms at ``weight``/``bias`` and where it was last zero: ``[2C]`` ``<P, W> +
        b A | <Gv, W>`` (a new tensor) and the ``[2C]`` view ``mean_at_own | half_var_at_own`` of
        :attr:`state`. Their difference is how far the running mean and half the variance move;
        :func:`move_running_stats` applies it and rebases. Two products, no sync."""
        patch_mean, half_var_grad, bias_weight, _, _ = self._views(self.state)
        channels = self._shape[1]
        w = self._flat(weight, half_var_grad.dtype)
        terms = torch.empty(2 * channels, dtype=w.dtype, device=w.device)
        mean_term, half_var_term = terms.view(2, channels)
        self._mean_term(patch_mean, w, out=mean_term)
        if bias is not None:
            mean_term.addcmul_(bias.detach().to(w.dtype), bias_weight)
        channel_dots(half_var_grad.unsqueeze(1), w, out=half_var_term)
        self.versions = parameter_versions(weight, bias)  # zero there once the terms are applied
        return terms, self.state[-2 * channels:]  # mean_at_own and half_var_at_own, adjacent

    @torch.no_grad()
    def rebase(self, weight: Tensor, bias: Optional[Tensor]) -> None:
        """Makes the drift zero at ``weight``/``bias`` without moving the running statistics (after
        setting statistics valid at these parameters)."""
        terms, at_own = self.moved_terms(weight, bias)
        at_own.copy_(terms)


@torch.no_grad()
def move_running_stats(moves: List[Tuple[Tensor, Tensor, Tensor, Tensor]]) -> None:
    """Moves layers' running statistics to their convs' current weights and rebases their drifts
    there (which leaves the statistics they describe at any other weights unchanged).

    Args:
        moves: per layer, :meth:`RunningDrift.moved_terms` and its ``running_mean``/``running_var``.

    Five ``foreach`` ops for any number of layers: after an optimizer step, one set of kernels for
    the whole model instead of five per layer. The variance is clamped at 0.
    """
    if not moves:
        return
    terms, at_own, means, variances = (list(t) for t in zip(*moves))
    torch._foreach_sub_(terms, at_own)  # now the moves
    torch._foreach_add_(at_own, terms)  # the terms at the current weights: the drift is zero there
    halves = [t.view(2, -1) for t in terms]
    torch._foreach_add_(means, [h[0] for h in halves])
    torch._foreach_add_(variances, [h[1] for h in halves], alpha=2.0)
    torch._foreach_clamp_min_(variances, 0.0)
