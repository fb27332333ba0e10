"""The compensated window estimates the old batches' statistics at the current weights far better
than the naive window (the paper's central claim), checked against re-running the network."""
import torch
from torch import nn

from mmcbn import convert_bn_to_cbn


def _net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))


def _relative_errors(net, batches, layer_index):
    """(naive, compensated) mean relative error of the window's means and variances."""
    cbn = net[layer_index]
    stats = cbn.window_stats()
    captured = []
    handle = net[layer_index - 1].register_forward_hook(lambda m, i, o: captured.append(o))
    net.eval()  # the CBN layers do not record; the first conv's output does not depend on them
    with torch.no_grad():
        for x in batches:
            net(x)
    net.train()
    handle.remove()
    true_mean = torch.stack([y.mean((0, 2, 3)) for y in captured])
    true_var = torch.stack([y.var((0, 2, 3), unbiased=False) for y in captured])

    def err(mean, var):
        e_mean = ((mean - true_mean).abs() / true_var.sqrt()).mean()
        e_var = ((var - true_var).abs() / true_var).mean()
        return (e_mean + e_var).item()

    return err(stats['raw_mean'], stats['raw_var']), err(stats['mean'], stats['var'])


def test_compensated_window_tracks_the_current_weights():
    torch.manual_seed(0)
    net = convert_bn_to_cbn(_net(), window_size=4)
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    history = []
    for step in range(30):
        x = torch.randn(2, 3, 16, 16) * torch.rand(1, 3, 1, 1) * 2
        labels = torch.randint(0, 5, (2, ))
        loss = nn.functional.cross_entropy(net(x), labels)
        history.append(x)
        if step == 29:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    # The window used at the last forward holds the 3 previous batches, compensated to the weights
    # of that forward; re-running those batches at those weights gives their true statistics.
    previous = history[-2:-5:-1]  # newest first, as window_stats orders them
    naive, compensated = _relative_errors(net, previous, 1)
    # first conv: its input does not change; exact for the mean, first order for the variance
    assert compensated < 0.05 * naive, (naive, compensated)
