"""Compensated running statistics: the EMA of old batches' statistics recomputed at the current weights.

The reference recomputes every past batch through the conv at its final weights in float64 and
averages with the EMA's weights: nothing here uses the layer's derivative identities.
"""
import pytest
import torch
from torch import nn

from mmcbn import CrossIterationBatchNorm2d


def _ema_weights(num_batches, momentum):
    """Weight of each batch (oldest first) and of the initial value in the running statistics."""
    if momentum is None:  # cumulative average: the first batch replaces the initial value
        return [1.0 / num_batches] * num_batches, 0.0
    return ([momentum * (1 - momentum)**(num_batches - 1 - t) for t in range(num_batches)],
            (1 - momentum)**num_batches)


def _train(window_size, momentum, groups=1, bias=True, steps=12, lr=0.2, frozen=False,
           eval_every=None, compensate=None, seed=0, after_step=None):
    torch.manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=bias).double()
    norm = CrossIterationBatchNorm2d(6, window_size=window_size, momentum=momentum,
                                     compensate_running_stats=compensate).double()
    norm.bind(conv, 'conv')
    if frozen:
        conv.requires_grad_(False)
    params = [p for p in list(conv.parameters()) + list(norm.parameters()) if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    batches, seen = [], []
    for step in range(steps):
        norm.iteration = step
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64) + 0.5
        batches.append(x)
        y = conv(x)
        seen.append((y.detach().mean((0, 2, 3)),
                     y.detach().transpose(0, 1).reshape(6, -1).var(1, unbiased=True)))
        out = norm(y)
        target = torch.randn_like(out)
        loss = (out * target).mean() + (out**2).mean() * 0.3
        opt.zero_grad()
        loss.backward()
        opt.step()
        if after_step is not None:
            after_step(conv, norm, batches)
        if eval_every and step % eval_every == eval_every - 1:
            norm.eval()  # switching modes must not change what comes out at the end
            norm.train()
    norm.seen = seen  # each batch's statistics at the weights of its own step
    return conv, norm, batches


def _reference(conv, batches, momentum):
    """EMA of the batches' mean and unbiased variance, all recomputed at the conv's final weights."""
    weights, init_weight = _ema_weights(len(batches), momentum)
    mean = torch.zeros(conv.out_channels, dtype=torch.float64)
    var = torch.full((conv.out_channels, ), init_weight, dtype=torch.float64)  # var starts at 1
    with torch.no_grad():
        for a, x in zip(weights, batches):
            y = conv(x)
            mean += a * y.mean((0, 2, 3))
            var += a * y.transpose(0, 1).reshape(y.shape[1], -1).var(1, unbiased=True)
    return mean, var


@pytest.mark.parametrize('window_size', [1, 3])
@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('groups,bias', [(1, True), (2, False)])
def test_running_stats_follow_the_weights(window_size, momentum, groups, bias):
    def buffers_hold_the_mean_at_the_new_weights(conv, norm, batches):
        # read straight after the optimizer step, in train mode: no eval(), no export called
        ref_mean, _ = _reference(conv, batches, momentum)
        torch.testing.assert_close(norm.running_mean, ref_mean, rtol=0, atol=1e-10)
        checked.append(len(batches))

    for lr in (0.3, 0.005):
        checked = []
        conv, norm, batches = _train(window_size, momentum, groups, bias, eval_every=5, lr=lr,
                                     after_step=buffers_hold_the_mean_at_the_new_weights)
        assert checked == list(range(1, 13))  # the mean is exact, however far the weights moved
        ref_mean, ref_var = _reference(conv, batches, momentum)
        var = norm.running_var
    # the variance is first order: at steps small against the weights, much closer than the
    # plain EMA, which lags by the whole drift
    _, plain, _ = _train(window_size, momentum, groups, bias, compensate=False, lr=lr)
    plain_err = (plain.running_var - ref_var).abs().max()
    err = (var - ref_var).abs().max()
    assert plain_err > 1e-4 * ref_var.mean(), 'the weights did not drift enough to test anything'
    assert err < 0.25 * plain_err, (err, plain_err)
    # and the plain layer's mean is indeed off (the trajectories are the same)
    assert (plain.running_mean - ref_mean).abs().max() > 1e-5


def test_eval_and_checkpoint_carry_the_compensated_statistics():
    conv, norm, batches = _train(3, 0.1)
    ref_mean, _ = _reference(conv, batches, 0.1)
    mean, var = norm.running_mean.clone(), norm.running_var.clone()
    state = norm.state_dict()  # saved in train mode
    torch.testing.assert_close(state['running_mean'], ref_mean, rtol=0, atol=1e-10)
    bn = nn.BatchNorm2d(6).double()
    bn.load_state_dict(state, strict=True)
    bn.eval()
    norm.eval()
    torch.testing.assert_close(norm.running_mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.running_var, var, rtol=0, atol=1e-12)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(norm(x), bn(x), rtol=0, atol=1e-12)
    # switching modes, saving and exporting again change nothing
    norm.train()
    norm.export_running_stats()
    norm.state_dict()
    norm.eval()
    torch.testing.assert_close(norm.running_mean, mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.running_var, var, rtol=0, atol=1e-12)


@pytest.mark.parametrize('momentum', [0.1, None])
def test_frozen_conv_gives_batchnorm_running_stats(momentum):
    conv, norm, batches = _train(3, momentum, frozen=True)
    bn = nn.BatchNorm2d(6, momentum=momentum).double()
    with torch.no_grad():
        for x in batches:
            bn(conv(x))
    torch.testing.assert_close(norm.running_mean, bn.running_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(norm.running_var, bn.running_var, rtol=1e-10, atol=1e-12)
    assert norm.running_stats_nbytes() == 0


def test_compensation_off_keeps_the_plain_ema():
    _, norm, _ = _train(1, 0.1, compensate=False)
    assert not norm.compensate_running_stats and norm.running_stats_nbytes() == 0
    weights, init_weight = _ema_weights(len(norm.seen), 0.1)
    ref_mean = sum(a * m for a, (m, _) in zip(weights, norm.seen))
    ref_var = init_weight + sum(a * v for a, (_, v) in zip(weights, norm.seen))
    norm.eval()
    torch.testing.assert_close(norm.running_mean, ref_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(norm.running_var, ref_var, rtol=0, atol=1e-12)


def test_weights_changed_without_an_optimizer_are_caught_or_exported_on_request():
    conv, norm, batches = _train(3, 0.1)
    with torch.no_grad():  # an in-place update moves the version counter: the next training
        conv.weight.mul_(1.1)  # forward moves the statistics first
    norm.iteration = 99
    norm(conv(batches[-1]))
    torch.testing.assert_close(norm.running_mean, _reference(conv, batches + [batches[-1]],
                                                             0.1)[0], rtol=0, atol=1e-10)
    # a write through .data bypasses the counter: export_running_stats() does the move
    conv.weight.data.mul_(0.9)
    conv.bias.data.add_(0.05)
    stale = norm.running_mean.clone()
    norm.export_running_stats()
    assert (norm.running_mean - stale).abs().max() > 1e-3
    torch.testing.assert_close(norm.running_mean, _reference(conv, batches + [batches[-1]],
                                                             0.1)[0], rtol=0, atol=1e-10)


def test_load_state_dict_resets_what_is_tracked():
    conv, norm, _ = _train(3, 0.1)
    assert norm.running_stats_nbytes() > 0
    loaded = {k: v.clone() for k, v in nn.BatchNorm2d(6).double().state_dict().items()}
    loaded['running_mean'] += 0.25
    norm.load_state_dict(loaded)
    with torch.no_grad():
        conv.weight.mul_(2.0)
    norm.export_running_stats()  # the loaded statistics have nothing left to follow
    torch.testing.assert_close(norm.running_mean, loaded['running_mean'], rtol=0, atol=0)
    torch.testing.assert_close(norm.running_var, loaded['running_var'], rtol=0, atol=0)


def test_memory_is_one_weight_sized_tensor_per_layer():
    conv, norm, _ = _train(3, 0.1)
    floats = norm.running_stats_nbytes() / 8
    weight = conv.weight.numel()
    # var_grad (|W|) + patch mean (|W| / C_out) + two per-channel vectors, the EMA of 1 and the
    # constant 1 it moves toward
    assert floats == weight + weight // conv.out_channels * conv.groups + 2 * 6 + 2


def test_window_source_refuses_explicit_compensation():
    with pytest.raises(ValueError, match="compensate_running_stats=True needs "
                       "running_stats_source='batch'"):
        CrossIterationBatchNorm2d(4, running_stats_source='window', compensate_running_stats=True)
    assert not CrossIterationBatchNorm2d(4, running_stats_source='window').compensate_running_stats
    assert not CrossIterationBatchNorm2d(4, compensation=False).compensate_running_stats
    assert CrossIterationBatchNorm2d(4, compensation=False,
                                     compensate_running_stats=True).compensate_running_stats
    assert CrossIterationBatchNorm2d(4).compensate_running_stats
    with pytest.raises(TypeError, match='compensate_running_stats must be'):
        CrossIterationBatchNorm2d(4, compensate_running_stats='yes')
