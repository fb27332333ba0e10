"""Analytic conv-moment derivatives and compensation against float64 autograd."""
import random

import pytest
import torch
from torch import nn

from mmcbn.layers.conv_moments import (ConvGeometry, PositionSample, choose_position_sample,
                                       compensate, compensation_backward, identity_excess,
                                       mixture_moments, moment_derivatives, output_moments)

CONV_SHAPES = [
    # in, out, kernel, stride, padding, dilation, groups, bias, padding_mode
    (4, 6, 3, 1, 1, 1, 1, True, 'zeros'),
    (4, 6, 3, 2, 2, 2, 2, False, 'zeros'),
    (6, 6, 3, 1, 1, 1, 6, True, 'zeros'),  # depthwise
    (3, 8, 7, 2, 3, 1, 1, False, 'zeros'),  # stem
    (8, 16, 1, 2, 0, 1, 1, True, 'zeros'),  # strided 1x1 (downsample)
    (8, 16, 1, 1, 0, 1, 4, False, 'zeros'),  # grouped 1x1
    (8, 8, 1, 3, 1, 1, 1, False, 'zeros'),  # padded, strided 1x1
    (8, 8, (3, 1), (1, 2), (1, 0), 1, 4, False, 'zeros'),
    (4, 4, 3, 1, 1, 1, 1, True, 'reflect'),
    (6, 264, 3, 2, 2, 2, 1, True, 'zeros'),  # wide, few positions: the im2col route on the CPU
]


def _conv(shape):
    cin, cout, k, s, p, d, g, bias, mode = shape
    return nn.Conv2d(cin, cout, k, s, p, d, g, bias=bias, padding_mode=mode).double()


@pytest.mark.parametrize('shape', CONV_SHAPES + [(8, 24, 1, 1, 0, 1, 1, False, 'zeros')])
@pytest.mark.parametrize('with_params', [False, True], ids=['from_y', 'with_params'])
def test_derivatives_match_autograd(shape, with_params):
    # with the parameters, the widening 1x1 convs take the Gram-matrix route
    _assert_derivatives_match_autograd(shape, with_params)


@pytest.mark.parametrize('shape', [CONV_SHAPES[1], CONV_SHAPES[3], CONV_SHAPES[6]])
def test_derivatives_of_a_channels_last_conv_match_autograd(shape):
    _assert_derivatives_match_autograd(shape, with_params=True, channels_last=True)


def _assert_derivatives_match_autograd(shape, with_params, channels_last=False):
    torch.manual_seed(0)
    conv = _conv(shape)
    x = torch.randn(3, conv.in_channels, 9, 11, dtype=torch.float64) + 0.5
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.to(
            memory_format=torch.channels_last)
    y = conv(x)
    params = (conv.weight, conv.bias) if with_params else ()
    patch_mean, sqmean_grad = moment_derivatives(x, y.detach(), ConvGeometry.of(conv), *params)
    mean, sqmean = y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))
    # mean_c and sqmean_c depend only on row c of the weight: row c of d(sum_c m_c)/dW is dm_c/dW_c
    dmean = torch.autograd.grad(mean.sum(), conv.weight, retain_graph=True)[0]
    dsqmean = torch.autograd.grad(sqmean.sum(), conv.weight)[0]
    per_group = conv.out_channels // conv.groups
    expected_patch = dmean.reshape(conv.groups, per_group, -1)
    for c in range(per_group):  # the patch mean is shared by the channels of a group
        torch.testing.assert_close(patch_mean, expected_patch[:, c], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sqmean_grad, dsqmean.reshape(conv.out_channels, -1), rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize('shape', CONV_SHAPES)
def test_compensation_is_first_order_taylor_with_clamp(shape):
    torch.manual_seed(1)
    conv = _conv(shape)
    x = torch.randn(2, conv.in_channels, 8, 8, dtype=torch.float64)
    params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    y = conv(x)
    mean, sqmean = y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))
    grads_mean = torch.autograd.grad(mean.sum(), params, retain_graph=True)
    grads_sq = torch.autograd.grad(sqmean.sum(), params)
    patch_mean, sqmean_grad = moment_derivatives(x, y.detach(), ConvGeometry.of(conv))
    mean0, var0 = output_moments(y.detach())
    for scale in (1e-3, 0.3, 3.0):  # the large step drives some second moments below mean^2
        deltas = [torch.randn_like(p) * scale * p.detach().abs().mean() for p in params]
        new = [p.detach() + d for p, d in zip(params, deltas)]
        exp_mean, exp_sq = mean.detach().clone(), sqmean.detach().clone()
        for g_m, g_s, d in zip(grads_mean, grads_sq, deltas):
            exp_mean += (g_m * d).reshape(len(d), -1).sum(1)
            exp_sq += (g_s * d).reshape(len(d), -1).sum(1)
        exp_var = torch.maximum(exp_sq, exp_mean**2) - exp_mean**2
        got_mean, got_var = compensate(mean0[None], var0[None], patch_mean[:, None],
                                       sqmean_grad[:, None],
                                       new[0], new[1] if len(new) > 1 else None)
        torch.testing.assert_close(got_mean[0], exp_mean, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got_var[0], exp_var, rtol=1e-9, atol=1e-9)
        # the mean is exact: it equals the conv's mean at the new weights
        with torch.no_grad():
            y_new = nn.functional.conv2d(
                nn.functional.pad(x, [conv.padding[1]] * 2 + [conv.padding[0]] * 2, 'reflect')
                if conv.padding_mode == 'reflect' else x, new[0], new[1] if len(new) > 1 else None,
                conv.stride, 0 if conv.padding_mode == 'reflect' else conv.padding, conv.dilation,
                conv.groups)
        torch.testing.assert_close(got_mean[0], y_new.mean((0, 2, 3)), rtol=1e-9, atol=1e-9)
        assert (got_var >= 0).all()


def test_output_moments_float32_for_half_inputs():
    y = (torch.randn(2, 3, 4, 4) * 3 + 100).to(torch.bfloat16)
    mean, var = output_moments(y)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    ref = y.double()
    torch.testing.assert_close(mean.double(), ref.mean((0, 2, 3)), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double(), ref.var((0, 2, 3), unbiased=False), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize('groups', [1, 3])
def test_compensation_backward_is_autograd_of_the_compensated_moments(groups):
    """Against autograd of the compensated moments written from their definitions:
    mean_hat = <p_group(c), W_c> + b_c and sqmean_hat = <g_c, W_c> + 2 mean_old b_c - sqmean_old."""
    torch.manual_seed(0)
    entries, channels, k = 4, 6, 5
    f64 = dict(dtype=torch.float64)
    mean, var = torch.randn(entries, channels, **f64), torch.rand(entries, channels, **f64)
    patch_mean = torch.randn(groups, entries, k, **f64)
    sqmean_grad = torch.randn(channels, entries, k, **f64)
    weight = torch.randn(channels, k, **f64, requires_grad=True)
    bias = torch.randn(channels, **f64, requires_grad=True)
    group_of = torch.arange(channels) // (channels // groups)
    mean_hat = torch.einsum('cek,ck->ec', patch_mean[group_of], weight) + bias
    sqmean_hat = (torch.einsum('cek,ck->ec', sqmean_grad, weight) + 2 * mean * bias -
                  (var + mean**2))
    grad_mean, grad_sqmean = torch.randn_like(mean), torch.randn_like(mean)
    expected = torch.autograd.grad((grad_mean * mean_hat + grad_sqmean * sqmean_hat).sum(),
                                   [weight, bias])
    got = compensation_backward(grad_mean, grad_sqmean, mean, patch_mean, sqmean_grad)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert compensation_backward(grad_mean, grad_sqmean, mean, patch_mean, sqmean_grad,
                                 with_bias=False)[1] is None
    # gradients handed over up to constant factors (as the normalisation's backward does)
    scaled = compensation_backward(grad_mean / -1.0, grad_sqmean / -0.5, mean, patch_mean,
                                   sqmean_grad, mean_scale=-1.0, sqmean_scale=-0.5)
    torch.testing.assert_close(scaled[0], expected[0])
    torch.testing.assert_close(scaled[1], expected[1])
    # and compensate() computes those moments (variance = second moment - mean^2)
    got_mean, got_var = compensate(mean, var, patch_mean, sqmean_grad,
                                   weight.detach().reshape(channels, k, 1, 1), bias.detach(),
                                   clamp=False)
    torch.testing.assert_close(got_mean, mean_hat.detach())
    torch.testing.assert_close(got_var, (sqmean_hat - mean_hat**2).detach())


@pytest.mark.parametrize('conv', [
    nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),  # the weight-gradient route
    nn.Conv2d(4, 12, 1),  # a widening 1x1 conv: the Gram-matrix route
    # wide, and few positions once sampled: the explicit im2col + GEMM route (padding on the crop)
    nn.Conv2d(4, 260, 3, padding=1),
], ids=['3x3', 'widening_1x1', 'wide_3x3'])
def test_sampled_derivative_averages_to_the_exact_one_over_all_offsets(conv):
    """Every position is in exactly one (row, col, image) offset of the grid, so the estimates of
    all offsets average to the exact derivative: the estimator is unbiased."""
    torch.manual_seed(0)
    conv = conv.double()
    x = torch.randn(5, 4, 11, 12, dtype=torch.float64)  # crops padded on one side only too
    y = conv(x).detach()
    geometry = ConvGeometry.of(conv)
    exact_mean, exact = moment_derivatives(x, y, geometry, conv.weight, conv.bias)
    row_stride, col_stride, batch_stride = 2, 3, 2
    estimates = []
    for row in range(row_stride):
        for col in range(col_stride):
            for image in range(batch_stride):
                sample = PositionSample(row_stride, col_stride, batch_stride, row, col, image)
                patch_mean, sqmean_grad = moment_derivatives(x, y, geometry, conv.weight,
                                                             conv.bias, sample)
                torch.testing.assert_close(patch_mean, exact_mean)  # always exact
                estimates.append(sqmean_grad)
    assert not torch.allclose(estimates[0], exact, rtol=1e-3)  # one offset alone is noisy
    torch.testing.assert_close(torch.stack(estimates).mean(0), exact)
    # Euler's identity holds for the exact derivative only
    mean, var = output_moments(y)
    assert identity_excess(exact, conv.weight, conv.bias, mean, var).abs().max() < 1e-10
    assert identity_excess(estimates[0], conv.weight, conv.bias, mean, var).abs().max() > 1e-3


def test_mixture_moments_are_the_moments_of_the_pooled_positions():
    torch.manual_seed(0)
    sizes = [5, 17, 9]
    groups = [torch.randn(n, 3, dtype=torch.float64) * (i + 1) + 10 * i for i, n in enumerate(sizes)]
    pooled = torch.cat(groups)
    shares = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    means = torch.stack([g.mean(0) for g in groups])
    variances = torch.stack([g.var(0, unbiased=False) for g in groups])
    mean, var = mixture_moments(shares, means, variances)
    torch.testing.assert_close(mean, pooled.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, pooled.var(0, unbiased=False), rtol=1e-12, atol=1e-12)
    # with batch dimensions: [N, B] shares, [N, B, C] moments, each column its own mixture
    batched = mixture_moments(torch.stack([shares, shares.flip(0)], 1),
                              torch.stack([means, means], 1), torch.stack([variances] * 2, 1))
    torch.testing.assert_close(batched[0][0], mean, rtol=1e-12, atol=1e-12)
    flipped = (shares.flip(0)[:, None] * means).sum(0)
    torch.testing.assert_close(batched[0][1], flipped, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('shape, budget', [
    ((2, 64, 24, 24), 256), ((2, 64, 32, 32), 1024), ((2, 64, 400, 667), 256),
    ((1, 8, 48, 48), 1000), ((2, 8, 25, 42), 256),
])
def test_position_sample_is_a_grid_over_every_image_of_a_batch(shape, budget):
    """Large maps are strided in space only, in every image (one image of two is a far noisier
    estimate), and keep between a third of the budget and the budget."""
    n, _, ho, wo = shape
    for seed in range(3):
        sample = choose_position_sample(shape, budget, random.Random(seed))
        assert sample.batch_stride == 1
        assert max(sample.row_stride, sample.col_stride) <= min(sample.row_stride,
                                                                 sample.col_stride) + 1
        kept = torch.zeros(n, ho, wo)[:, sample.row::sample.row_stride,
                                      sample.col::sample.col_stride].numel()
        assert budget / 3 <= kept <= budget * 1.1, kept
    assert choose_position_sample((2, 8, 16, 16), 512, random.Random(0)) is None  # fits: exact
    # the same generator state gives the same sample (the layer seeds its own generator)
    assert choose_position_sample(shape, budget, random.Random(5)) == \
        choose_position_sample(shape, budget, random.Random(5))


def test_position_sample_strides_the_batch_of_small_maps():
    """RoI features: 7x7 maps, too small for the spatial strides alone."""
    sample = choose_position_sample((1000, 256, 7, 7), 100, random.Random(0))
    assert (sample.row_stride, sample.col_stride) == (7, 7) and sample.batch_stride == 10


@pytest.mark.parametrize('cin, cout, k, s, p, d, g, size, n, budget', [
    (4, 6, 3, 1, 1, 1, 1, 11, 3, 20),  # a map the grid does not divide: edge positions weighted 0
    (4, 6, 3, 2, 2, 2, 2, 13, 2, 12),  # strided, dilated, grouped
    (3, 8, 7, 2, 3, 1, 1, 17, 2, 20),  # stem-like
    (6, 4, 3, 1, 1, 1, 1, 2, 6, 4),  # a map too small for the grid alone: every other image too
    (4, 16, 1, 1, 0, 1, 1, 10, 3, 20),  # widening 1x1: the Gram-matrix route
])
def test_gathered_sample_averages_to_the_exact_derivative_over_its_cycle(cin, cout, k, s, p, d, g,
                                                                          size, n, budget):
    """The compiled steps' sample (device offsets cycling through every grid): averaged over one
    cycle it is the exact derivative, since every position is taken exactly once."""
    from mmcbn.layers.conv_moments import gathered_position_sample
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, p, d, g).double()
    x = torch.randn(n, cin, size, size, dtype=torch.float64)
    y = conv(x).detach()
    geometry = ConvGeometry.of(conv)
    exact = moment_derivatives(x, y, geometry, conv.weight, conv.bias)
    first = gathered_position_sample(tuple(y.shape), budget, torch.tensor(0))
    assert first is not None and first.inverse_probability > 1
    cycle = first.inverse_probability
    total = torch.zeros_like(exact[1])
    for step in range(cycle):
        sample = gathered_position_sample(tuple(y.shape), budget, torch.tensor(step))
        patch_mean, sqmean_grad = moment_derivatives(x, y, geometry, conv.weight, conv.bias,
                                                     sample)
        torch.testing.assert_close(patch_mean, exact[0])  # the mean's derivative stays exact
        total += sqmean_grad
    torch.testing.assert_close(total / cycle, exact[1], rtol=1e-10, atol=1e-12)


def test_gathered_sample_is_the_sliced_sample_inside_the_map():
    """At one offset, on a map the grid divides, the gathered sample takes the positions the
    sliced one takes (two implementations of one estimate)."""
    from mmcbn.layers.conv_moments import GatheredSample
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).double()
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    y = conv(x).detach()
    geometry = ConvGeometry.of(conv)
    sliced = PositionSample(3, 4, 1, 2, 1, 0)
    gathered = GatheredSample(3, 4, 1, torch.tensor([0, 2, 1]))
    torch.testing.assert_close(moment_derivatives(x, y, geometry, sample=gathered)[1],
                               moment_derivatives(x, y, geometry, sample=sliced)[1])
