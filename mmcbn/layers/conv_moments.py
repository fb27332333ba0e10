"""Moments of a conv's output and their derivatives w.r.t. the conv's weight.

Pure functions (caching only constants of a geometry), no window, no schedule. For a conv
``y = W * x + b`` and each output channel ``c`` (``M`` = number of output positions ``N * Ho * Wo``,
``p`` = an im2col patch of ``x``):

* ``mean_c = mean(y_c)`` and ``sqmean_c = mean(y_c ** 2)``;
* ``d mean_c / d W_c = mean(p)``: one patch mean per group, shared by every channel of the group;
* ``d sqmean_c / d W_c = (2 / M) * sum(y_c * p)``: the conv's weight gradient for ``grad_y = 2y/M``.

Because ``mean`` is linear in ``W`` and ``<d sqmean/dW, W> = 2 * sqmean - 2 * b * mean`` at the weights
where the derivatives were taken, an entry recorded at old weights is moved to the current weights
``(W_t, b_t)`` without storing the old weights:

* ``mean_hat = <patch_mean, W_t> + b_t``                           (exact),
* ``sqmean_hat = <sqmean_grad, W_t> + 2 * mean_old * b_t - sqmean_old``  (first-order Taylor).

Both are linear in ``(W_t, b_t)``; :func:`compensation_backward` is their adjoint, which carries a
gradient through the compensated entries to the current conv parameters.
"""
import dataclasses
import functools
import math
import random
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class ConvGeometry:
    """Everything about a 2d conv except its parameters.

    Args:
        weight_shape: ``(C_out, C_in // groups, kh, kw)``.
        stride, padding, dilation: pairs, as in :class:`torch.nn.Conv2d`.
        groups: number of groups.
        padding_mode: ``'zeros'`` or one of :func:`torch.nn.functional.pad`'s modes; a non-zero mode
            pads the input before a conv with no padding, as ``nn.Conv2d`` does.
    """
    weight_shape: Tuple[int, int, int, int]
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    padding_mode: str = 'zeros'

    @classmethod
    def of(cls, conv: torch.nn.Conv2d) -> 'ConvGeometry':
        """The geometry of an ``nn.Conv2d`` (or subclass)."""
        if isinstance(conv.padding, str):  # 'same' / 'valid'
            if conv.padding == 'valid':
                padding = (0, 0)
            else:
                padding = tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
                if any(d * (k - 1) % 2 for d, k in zip(conv.dilation, conv.kernel_size)):
                    raise ValueError(f"padding='same' with an even receptive field is asymmetric: "
                                     f"kernel_size={conv.kernel_size}, dilation={conv.dilation}")
        else:
            padding = tuple(conv.padding)
        return cls(tuple(conv.weight.shape), tuple(conv.stride), padding, tuple(conv.dilation),
                   conv.groups, conv.padding_mode)

    @property
    def out_channels(self) -> int:
        return self.weight_shape[0]

    @property
    def patch_size(self) -> int:
        """Number of weights per output channel, ``C_in // groups * kh * kw``."""
        _, cin_g, kh, kw = self.weight_shape
        return cin_g * kh * kw


def output_moments(y: Tensor, traced: bool = False) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and (biased) variance of an NCHW tensor, in float32 or wider.

    Uses BatchNorm's own statistics kernel (a numerically stable one-pass reduction, several times
    faster on CPU than ``var_mean`` over dims (0, 2, 3)). Half/bfloat16 input is reduced in float32:
    the float32 scratch buffers passed in make the kernel accumulate and return float32. Under
    ``torch.compile`` (``traced``) a ``var_mean`` the compiler can trace and fuse.
    """
    if traced:  # the BN kernel has no shape function for torch.compile
        var, mean = torch.var_mean(y.to(torch.promote_types(y.dtype, torch.float32)),
                                   dim=(0, 2, 3), correction=0)
        return mean, var
    if y.dtype in (torch.float32, torch.float64):
        return torch.batch_norm_update_stats(y, None, None, 0.0)
    scratch_mean = torch.zeros(y.shape[1], device=y.device, dtype=torch.float32)
    scratch_var = torch.ones_like(scratch_mean)
    return torch.batch_norm_update_stats(y, scratch_mean, scratch_var, 0.0)


def mixture_moments(weights: Tensor, means: Tensor,
                    variances: Tensor) -> Tuple[Tensor, Tensor]:
    """Mean and variance of a mixture of groups of positions, over dim 0.

    Args:
        weights: ``[N, *batch]``, each group's share (summing to 1 over dim 0).
        means, variances: ``[N, *batch, C]``, each group's (biased) moments.

    Returns:
        ``sum_i w_i mean_i`` and ``sum_i w_i (var_i + (mean_i - mean)^2)``, ``[*batch, C]``: the
        variance written about the pooled mean, with no ``E[y^2] - E[y]^2`` cancellation. Two
        batched matrix products.
    """
    shares = weights.movedim(0, -1).unsqueeze(-2)  # [*batch, 1, N]
    means = means.movedim(0, -2)  # [*batch, N, C]
    mean = shares @ means
    spread = means - mean
    var = shares @ variances.movedim(0, -2).addcmul(spread, spread)
    return mean.squeeze(-2), var.squeeze(-2)


def _padded(x: Tensor, geometry: ConvGeometry) -> Tuple[Tensor, Tuple[int, int]]:
    if geometry.padding_mode == 'zeros':
        return x, geometry.padding
    ph, pw = geometry.padding
    return F.pad(x, (pw, pw, ph, ph), mode=geometry.padding_mode), (0, 0)


def _weight_grad(grad_y: Tensor, x: Tensor, geometry: ConvGeometry, padding) -> Tensor:
    shape_only = x.new_empty(()).expand(geometry.weight_shape)
    _, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_y, x, shape_only, None, list(geometry.stride), list(padding),
        list(geometry.dilation), False, [0, 0], geometry.groups, [False, True, False])
    return grad_w


# On the CPU, oneDNN's weight-gradient conv is several times slower than an explicit im2col + GEMM
# when the output is wide and has few positions (ResNet's last stage on small images: 512 -> 512
# channels at 5x5, 10.7 ms against 3.0 ms on 2 cores); elsewhere it is as fast or faster.
_IM2COL_MIN_CHANNELS = 257
_IM2COL_MAX_POSITIONS = 512


def _output_patch_product(y: Tensor, x: Tensor, geometry: ConvGeometry, padding) -> Tensor:
    """``sum over positions of y_c * p`` for every channel: ``[C_out, C_in // groups, kh, kw]``."""
    n, c_out, ho, wo = y.shape
    if (x.device.type == 'cpu' and geometry.groups == 1 and c_out >= _IM2COL_MIN_CHANNELS
            and n * ho * wo <= _IM2COL_MAX_POSITIONS):
        cols = F.unfold(x, geometry.weight_shape[2:], geometry.dilation, padding,
                        geometry.stride)  # [N, K, L]
        cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # [K, N * L]
        return y.transpose(0, 1).reshape(c_out, -1).mm(cols.t()).reshape(geometry.weight_shape)
    return _weight_grad(y, x, geometry, padding)


@dataclass(frozen=True)
class SampleGrid:
    """Every ``row_stride``-th row and ``col_stride``-th column of a conv's output, in every
    ``batch_stride``-th image: with its offset drawn uniformly (or cycled through), each position
    is taken with probability ``1 / inverse_probability``, so a sum over the grid times that is an
    unbiased estimate of the sum over all positions."""
    row_stride: int
    col_stride: int
    batch_stride: int

    @property
    def inverse_probability(self) -> int:
        return self.row_stride * self.col_stride * self.batch_stride


@dataclass(frozen=True)
class PositionSample(SampleGrid):
    """A :class:`SampleGrid` from the Python offsets ``row``, ``col`` and ``image``."""
    row: int
    col: int
    image: int

    def take(self, t: Tensor) -> Tensor:
        """The sampled positions of an NCHW tensor laid out on the output's grid (a view)."""
        return t[self.image::self.batch_stride, :, self.row::self.row_stride,
                 self.col::self.col_stride]


@functools.lru_cache(maxsize=4096)
def _sample_strides(num_images: int, rows: int, cols: int,
                    budget: int) -> Tuple[int, int, int]:
    """Row, column and batch strides that keep at most about ``budget`` of the positions, as many
    as possible. Spatial strides first, a square or nearly square grid over every image
    (neighbouring positions differ less than images do: one image of two is a far noisier estimate
    than a grid over both, docs/evidence.md); the batch is strided only when the map is too small
    for the spatial strides alone (RoI features)."""
    ratio = num_images * rows * cols / budget
    r = max(1, math.isqrt(int(ratio)))
    best = None
    for row_stride, col_stride in ((r, r), (r, r + 1), (r + 1, r), (r + 1, r + 1)):
        row_stride, col_stride = min(row_stride, rows), min(col_stride, cols)
        kept = row_stride * col_stride
        key = (kept < ratio, kept if kept >= ratio else -kept)  # covering, then the most kept
        if best is None or key < best[0]:
            best = key, row_stride, col_stride
    _, row_stride, col_stride = best
    batch_stride = min(num_images, math.ceil(ratio / (row_stride * col_stride)))
    return row_stride, col_stride, batch_stride


def choose_position_sample(shape: Tuple[int, int, int, int], budget: Optional[int],
                           rng: random.Random) -> Optional[PositionSample]:
    """A :class:`PositionSample` of at most about ``budget`` positions of an NCHW output, or None
    (all positions) when it has no more than that; strides from :func:`_sample_strides`, offsets
    from ``rng``."""
    strides = _grid_strides(shape, budget)
    if strides is None:
        return None
    row_stride, col_stride, batch_stride = strides
    return PositionSample(row_stride, col_stride, batch_stride, rng.randrange(row_stride),
                          rng.randrange(col_stride), rng.randrange(batch_stride))


def _grid_strides(shape: Tuple[int, int, int, int],
                  budget: Optional[int]) -> Optional[Tuple[int, int, int]]:
    """The row, column and batch strides of a sample of about ``budget`` positions of an NCHW
    output, or None when every position is taken."""
    n, _, ho, wo = shape
    if budget is None or n * ho * wo <= budget:
        return None
    strides = _sample_strides(n, ho, wo, budget)
    return None if strides == (1, 1, 1) else strides


@dataclass(frozen=True)
class GatheredSample(SampleGrid):
    """A :class:`SampleGrid` with its offset on the device: ``offset`` (a long tensor ``[3]``:
    image, row, column) picks the grid, the positions are gathered with ``index_select`` and
    those past the map's edge weighted 0. Nothing about it is a Python number that changes
    between steps, so a compiled step traces it once (a :class:`PositionSample` slices with its
    offsets, and each new offset is a new graph). :func:`cycling_offset` makes the offset go
    through every grid in turn: over a cycle every position is taken once, so the estimate
    averages to the exact sum."""
    offset: Tensor

    def positions(self, n: int, h: int, w: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """The images, rows and columns of the grid on an ``[n, *, h, w]`` map (those past the
        edge clamped onto it) and ``[images, 1, rows, cols]`` whether each position is inside."""
        def steps(size: int, stride: int, start: Tensor) -> Tuple[Tensor, Tensor]:
            index = torch.arange(-(-size // stride), device=start.device) * stride + start
            return index.clamp_max(size - 1), index < size

        (images, inside_n), (rows, inside_h), (cols, inside_w) = (
            steps(n, self.batch_stride, self.offset[0]), steps(h, self.row_stride, self.offset[1]),
            steps(w, self.col_stride, self.offset[2]))
        return images, rows, cols, inside_n[:, None, None, None] & inside_h[:, None] & inside_w

    def take(self, t: Tensor) -> Tensor:
        """The sampled positions of an NCHW tensor laid out on the output's grid, those past
        the edge as zeros."""
        images, rows, cols, inside = self.positions(t.shape[0], *t.shape[2:])
        return _gathered(t, images, rows, cols) * inside.to(t.dtype)


def _gathered(t: Tensor, images: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    return t.index_select(0, images).index_select(2, rows).index_select(3, cols)


def cycling_offset(counter: Tensor, strides: Tuple[int, int, int]) -> Tensor:
    """The ``[3]`` offset (image, row, column) of step ``counter`` in a cycle through every grid
    of ``strides`` (batch, row, column)."""
    batch, rows, cols = strides
    t = counter.remainder(batch * rows * cols)
    return torch.stack([t // (rows * cols), t.remainder(rows), (t // rows).remainder(cols)])


def _gathered_output_patch_product(y: Tensor, x: Tensor, geometry: ConvGeometry, padding,
                                   sample: GatheredSample, scale: float) -> Tensor:
    """:func:`_sampled_output_patch_product` for a :class:`GatheredSample`: the input rows and
    columns under each sampled position's kernel are gathered side by side (``kh`` rows per
    sampled row), so that a product with the kernel's extent as its stride reads each sampled
    patch once."""
    (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
    kh, kw = geometry.weight_shape[2:]
    ph, pw = padding
    # the sampled output positions (those past the edge clamped onto it, weighted 0 there), then
    # the input rows and columns under their kernels
    images, rows, cols, inside = sample.positions(y.shape[0], *y.shape[2:])
    y = _gathered(y, images, rows, cols) * inside.to(y.dtype) * scale
    x = F.pad(x, (pw, pw, ph, ph)) if ph or pw else x
    rows = (rows[:, None] * sh + dh * torch.arange(kh, device=rows.device)).reshape(-1)
    cols = (cols[:, None] * sw + dw * torch.arange(kw, device=cols.device)).reshape(-1)
    x = _gathered(x, images, rows, cols)
    gathered = dataclasses.replace(geometry, stride=(kh, kw), dilation=(1, 1))
    return _output_patch_product(y, x, gathered, (0, 0))


def gathered_position_sample(shape: Tuple[int, int, int, int], budget: Optional[int],
                             counter: Tensor) -> Optional[GatheredSample]:
    """:func:`choose_position_sample`'s grid as a :class:`GatheredSample` at step ``counter`` of
    the cycle through its offsets (what a compiled step takes), or None (all positions)."""
    strides = _grid_strides(shape, budget)
    if strides is None:
        return None
    row_stride, col_stride, batch_stride = strides
    return GatheredSample(row_stride, col_stride, batch_stride,
                          cycling_offset(counter, (batch_stride, row_stride, col_stride)))


def _crop_of_padded(x: Tensor, dim: int, pad: int, start: int,
                    stop: int) -> Tuple[Tensor, int, int]:
    """Rows ``[start, stop)`` along ``dim`` of ``x`` zero-padded by ``pad`` on both sides, as the
    crop of ``x`` itself and the zeros still to pad before and after it (padding the whole input
    first would cost a pass over it)."""
    size = x.shape[dim]
    first, last = min(max(start - pad, 0), size), min(max(stop - pad, 0), size)
    return x.narrow(dim, first, last - first), max(pad - start, 0), max(stop - pad - size, 0)


def _sampled_output_patch_product(y: Tensor, x: Tensor, geometry: ConvGeometry, padding,
                                  sample: PositionSample, scale: float) -> Tensor:
    """``scale * sum over the sampled positions of y_c * p``: the same product with stride
    ``(row_stride, col_stride) * s`` over the crop of the input the sampled patches cover (the
    scale is applied to the sampled outputs, fewer numbers than the result)."""
    rh, rw = sample.row_stride, sample.col_stride
    (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
    kh, kw = geometry.weight_shape[2:]
    y = sample.take(y) * scale
    rows, cols = y.shape[2:]
    top, left = sample.row * sh, sample.col * sw
    x = x[sample.image::sample.batch_stride]
    x, pad_top, pad_bottom = _crop_of_padded(x, 2, padding[0], top,
                                             top + (rows - 1) * rh * sh + dh * (kh - 1) + 1)
    x, pad_left, pad_right = _crop_of_padded(x, 3, padding[1], left,
                                             left + (cols - 1) * rw * sw + dw * (kw - 1) + 1)
    if pad_top or pad_bottom or pad_left or pad_right:
        x = F.pad(x, (pad_left, pad_right, pad_top, pad_bottom))
    strided = dataclasses.replace(geometry, stride=(rh * sh, rw * sw))
    return _output_patch_product(y, x, strided, (0, 0))


def moment_derivatives(x: Tensor, y: Tensor, geometry: ConvGeometry,
                       weight: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None,
                       sample: Optional[PositionSample] = None) -> Tuple[Tensor, Tensor]:
    """Derivatives of the output moments w.r.t. the conv weight, computed analytically.

    Args:
        x: the conv's input, NCHW (any float dtype; computed in float32 or wider).
        y: the conv's output for ``x`` (with its bias, if any).
        geometry: the conv's geometry.
        weight, bias: the conv's parameters that gave ``y``. Optional; with them an ungrouped,
            unpadded 1x1 conv (float32/64 output) takes the route through the input's Gram matrix
            where it costs fewer multiply-adds (:func:`_gram_is_cheaper`; the result is the same).
        sample: estimate ``sqmean_grad`` from these output positions only (unbiased; the patch
            mean stays exact). None: every position.

    Returns:
        ``patch_mean`` of shape ``[groups, K]`` (``d mean_c / d W_c`` for every ``c`` in a group) and
        ``sqmean_grad`` of shape ``[C_out, K]`` (``d sqmean_c / d W_c``), ``K = C_in // groups * kh * kw``.
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    full_precision_y = y.dtype == dtype
    x, y = x.to(dtype), y.to(dtype)
    x, padding = _padded(x, geometry)
    n, c_out, ho, wo = y.shape
    num_positions = n * ho * wo
    g = geometry.groups
    _, cin_g, kh, kw = geometry.weight_shape
    # an unpadded 1x1 conv's patch is a strided pixel of its input
    pixels = (x[:, :, ::geometry.stride[0], ::geometry.stride[1]][:, :, :ho, :wo]
              if (kh, kw) == (1, 1) and tuple(padding) == (0, 0) else None)
    if (pixels is not None and weight is not None and full_precision_y and g == 1
            and _gram_is_cheaper(cin_g, c_out, num_positions if sample is None else
                                 num_positions // sample.inverse_probability)):
        return _widening_1x1_derivatives(pixels, weight, bias, sample)
    # scaling the small result instead of grad_y saves a pass over the output
    if sample is None:
        sqmean_grad = _output_patch_product(y, x, geometry, padding).mul_(2.0 / num_positions)
    else:
        product = _gathered_output_patch_product if isinstance(sample, GatheredSample) else \
            _sampled_output_patch_product
        sqmean_grad = product(y, x, geometry, padding, sample,
                              2.0 * sample.inverse_probability / num_positions)
    # d mean / d W: the mean patch.
    patch_mean = pixels.mean((0, 2, 3)) if pixels is not None else \
        _patch_mean(x, geometry, padding, (ho, wo))
    return patch_mean.reshape(g, -1), sqmean_grad.reshape(c_out, -1)


def _patch_mean(x: Tensor, geometry: ConvGeometry, padding, output_size) -> Tensor:
    """The mean im2col patch, ``[C_in, kh, kw]``: the sum over a kernel offset's positions is the
    sum over a grid of rows times a grid of columns (a patch entry is one input pixel, and the
    pixels an offset reads are the output grid shifted), so the batch's mean image times one
    indicator matrix per axis gives it: two small products, 2-3x faster on the CPU than a conv's
    weight gradient with one output channel (which takes torch's slow conv path on small maps)."""
    c, h, w = x.shape[1:]
    kh, kw = geometry.weight_shape[2:]
    (sh, sw), (dh, dw) = geometry.stride, geometry.dilation
    ho, wo = output_size
    rows = _offset_grid(h, ho, kh, sh, dh, padding[0], 1.0, x.dtype, x.device)  # [H, kh]
    cols = _offset_grid(w, wo, kw, sw, dw, padding[1], 1.0 / (ho * wo), x.dtype, x.device)
    col_sums = x.mean(0).reshape(c * h, w).mm(cols)  # [C * H, kw]
    return torch.matmul(rows.t(), col_sums.view(c, h, kw))


@functools.lru_cache(maxsize=256)
def _offset_grid(size: int, output_size: int, kernel: int, stride: int, dilation: int, pad: int,
                 scale: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[size, kernel]``: ``scale`` times how many output positions read input row ``r`` at
    kernel offset ``i`` (0 or 1), along one axis of the conv. Cached: a steady step builds none."""
    read = (torch.arange(output_size, device=device)[:, None] * stride +
            torch.arange(kernel, device=device) * dilation - pad)  # [out, kernel]
    hits = read == torch.arange(size, device=device)[:, None, None]  # [size, out, kernel]
    return hits.sum(1).to(dtype).mul_(scale)


def _gram_is_cheaper(in_channels: int, out_channels: int, positions: int) -> bool:
    """Whether a 1x1 conv's ``sum(y p^T)`` costs fewer multiply-adds through the input's Gram
    matrix (``P K^2 + C K^2``) than directly (``P K C``)."""
    return in_channels * (positions + out_channels) < positions * out_channels


def _widening_1x1_derivatives(pixels: Tensor, weight: Tensor, bias: Optional[Tensor],
                              sample: Optional[PositionSample] = None) -> Tuple[Tensor, Tensor]:
    """``moment_derivatives`` of an ungrouped, unpadded 1x1 conv from the input's Gram matrix;
    ``pixels``: the input at the output positions, ``[N, K, Ho, Wo]``.

    At every position ``y = W p + b``, so ``(2/M) sum(y p^T) = 2 W G + 2 b mean(p)^T`` with
    ``G = (1/M) sum(p p^T)``: ``(M + C) K^2`` multiply-adds instead of ``M K C``, fewer when the
    conv widens (the bottleneck's last conv and the downsample shortcut, 4x and 2x) over many
    positions (:func:`_gram_is_cheaper`).
    """
    n, k, ho, wo = pixels.shape
    num_positions = n * ho * wo
    patch_mean = pixels.mean((0, 2, 3)).unsqueeze(0)  # [1, K]
    if sample is not None:  # the Gram matrix of the sampled positions, scaled to an estimate
        pixels = sample.take(pixels)
    patches = pixels.permute(0, 2, 3, 1).reshape(-1, k)
    scale = (sample.inverse_probability if sample is not None else 1) / num_positions
    gram = patches.t().mm(patches).mul_(scale)
    w = weight.detach().to(patches.dtype).reshape(weight.shape[0], -1)
    sqmean_grad = w.mm(gram)
    if bias is not None:
        sqmean_grad.addr_(bias.detach().to(patches.dtype), patch_mean[0])
    return patch_mean, sqmean_grad.mul_(2.0)


def channel_dots(stacked: Tensor, w: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``<stacked[c, e], w[c]>`` for every channel ``c`` and entry ``e``: ``[C, E]`` from
    ``[C, E, K]`` and ``[C, K]``.

    Written as ``[C, 1, K] @ [C, K, E]``: on the CPU the same product as ``[C, E, K] @ [C, K, 1]``
    (batched matrix-vector products) ran 2-3x slower, and this is a pass over the window's
    derivatives in every forward and over a layer's drift after every optimizer step.
    """
    channels, num_entries, _ = stacked.shape
    return torch.bmm(w.unsqueeze(1), stacked.transpose(1, 2),
                     out=None if out is None else out.view(channels, 1, num_entries)
                     ).view(channels, num_entries)


def compensate(mean: Tensor, var: Tensor, patch_mean: Tensor, sqmean_grad: Tensor, weight: Tensor,
               bias: Optional[Tensor], clamp: bool = True,
               excess: Optional[Tensor] = None,
               offset: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Moves recorded moments to the current conv weights (first-order Taylor, exact for the mean).

    Args:
        mean, var: ``[E, C]`` per-entry mean and variance recorded at the old weights.
        patch_mean: ``[groups, E, K]``; sqmean_grad: ``[C, E, K]`` (see
            :func:`moment_derivatives`; entries stacked along dim 1, channel-major, so that both
            products are batched matrix multiplications over contiguous memory).
        weight: the current conv weight ``[C, C_in // groups, kh, kw]``; bias: ``[C]`` or None.
        clamp: clamp the variance at 0; False leaves it to the caller (which pools entries across
            processes first).
        excess: ``[E, C]`` :func:`identity_excess` of each entry, for sampled derivatives (None:
            exact ones, whose excess is 0).
        offset: ``[E, C]`` the recorded second moments ``var + mean^2`` plus ``excess``, if kept
            (:class:`~mmcbn.layers.window.MomentWindow` does; ``excess`` is then not given).

    Returns:
        The compensated ``mean`` and ``var`` ``[E, C]``, where ``var = max(sqmean, mean^2) - mean^2``:
        the clamp keeps each entry a valid (mean, second moment) pair, so the variance is >= 0.
        (The variance is as precise as the product ``<sqmean_grad, W_t>``, whose rounding is of the
        order of the second moment's in any form of the formula.)
    """
    groups, num_entries, k = patch_mean.shape
    channels = weight.shape[0]
    w = weight.detach().to(mean.dtype).reshape(channels, k)
    # [g, C/g, K] @ [g, K, E] -> [g, C/g, E] -> [E, C]
    mean_hat = torch.bmm(w.view(groups, channels // groups, k), patch_mean.transpose(1, 2))
    mean_hat = mean_hat.view(channels, num_entries).t()
    # sqmean_hat = <sqmean_grad, W_t> + 2 * mean_old * b_t - sqmean_old (- excess)
    if offset is None:
        offset = torch.addcmul(var, mean, mean)
        if excess is not None:
            offset = offset + excess
    # [C, 1, K] @ [C, K, E] - offset, as channel_dots
    sqmean_hat = torch.baddbmm(offset.t().unsqueeze(1), w.unsqueeze(1), sqmean_grad.transpose(1, 2),
                               beta=-1.0).view(channels, num_entries).t()
    if bias is not None:
        b = bias.detach().to(mean.dtype)
        mean_hat = mean_hat + b
        sqmean_hat = sqmean_hat.addcmul_(mean, b, value=2.0)
    var_hat = sqmean_hat.addcmul_(mean_hat, mean_hat, value=-1.0)
    return mean_hat, var_hat.clamp_min(0.0) if clamp else var_hat


def compensation_backward(grad_mean: Tensor, grad_sqmean: Tensor, mean: Tensor, patch_mean: Tensor,
                          sqmean_grad: Tensor, with_bias: bool = True, mean_scale: float = 1.0,
                          sqmean_scale: float = 1.0) -> Tuple[Tensor, Optional[Tensor]]:
    """The gradient of the compensated moments w.r.t. the current conv weight and bias.

    The adjoint of :func:`compensate` in the (mean, second moment) form: ``mean_hat = <p, W_c> + b_c``
    and ``sqmean_hat = <g_c, W_c> + 2 * mean_old * b_c - sqmean_old``.

    Args:
        grad_mean, grad_sqmean: ``[E, C]`` gradients w.r.t. each entry's ``mean_hat`` and
            ``sqmean_hat`` (zero for entries that are not compensated), up to the factors
            ``mean_scale`` and ``sqmean_scale`` (folded into the products, so that a caller's
            signs and constants cost no pass of their own).
        mean: ``[E, C]`` the entries' recorded means (finite).
        patch_mean, sqmean_grad: ``[groups, E, K]`` and ``[C, E, K]``, as for :func:`compensate`.
        with_bias: whether the conv has a bias (else no bias gradient is computed).

    Returns:
        The weight gradient ``[C, K]`` and the bias gradient ``[C]`` (None without a bias).
    """
    groups, num_entries, k = patch_mean.shape
    channels = sqmean_grad.shape[0]
    # [C, 1, E] @ [C, E, K] -> [C, 1, K]; then += [g, C/g, E] @ [g, E, K] in place (no copy of the
    # accumulator, unlike baddbmm into a new tensor)
    grad_weight = torch.bmm(grad_sqmean.t().unsqueeze(1), sqmean_grad)
    grad_weight.view(groups, channels // groups, k).baddbmm_(
        grad_mean.t().reshape(groups, channels // groups, num_entries), patch_mean,
        beta=sqmean_scale, alpha=mean_scale)
    grad_bias = None
    if with_bias:
        grad_bias = torch.addcmul(grad_mean, mean, grad_sqmean,
                                  value=2.0 * sqmean_scale / mean_scale).sum(0)
        if mean_scale != 1.0:
            grad_bias = grad_bias.mul_(mean_scale)
    return grad_weight.reshape(channels, k), grad_bias


def identity_excess(sqmean_grad: Tensor, weight: Tensor, bias: Optional[Tensor], mean: Tensor,
                    var: Tensor) -> Tensor:
    """``<sqmean_grad, W> + 2 b mean - 2 sqmean`` per channel, at the weights the derivative was
    taken at: 0 for the exact derivative (Euler's identity), not for a sampled one, whose
    compensation must subtract it (else its noise enters through the identity; :func:`compensate`'s
    ``excess``)."""
    channels = weight.shape[0]
    w = weight.detach().to(sqmean_grad.dtype).reshape(channels, 1, -1)
    # [C, 1, K] @ [C, K, 1] - 2 sqmean, as channel_dots
    excess = torch.baddbmm(torch.addcmul(var, mean, mean).view(channels, 1, 1), w,
                           sqmean_grad.unsqueeze(-1), beta=-2.0).view(channels)
    if bias is not None:
        excess = excess.addcmul_(bias.detach().to(excess.dtype), mean, value=2.0)
    return excess
