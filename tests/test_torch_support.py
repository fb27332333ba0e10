"""Behaviour that depends on the running torch: what a layer does where torch lacks an API."""
import warnings

import torch
from torch import nn

from mmcbn import CrossIterationBatchNorm2d, convert_cbn_to_bn


def test_graph_binding_without_the_default_hooks_query_is_exact(monkeypatch):
    """torch 2.1 has no ``_top_saved_tensors_default_hooks``: a layer nobody bound still binds
    from the graph and reads its conv's input there (the saved tensor itself tells whether a hook
    holds it), so it is compensated exactly as on a newer torch: the float64 reference."""
    from reference_training import CONV_SHAPES, train_against_reference
    monkeypatch.delattr(torch._C._autograd, '_top_saved_tensors_default_hooks', raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)  # nothing to report
        warnings.filterwarnings('ignore', message='mmcbn: CBN layers are training without CBNHook')
        cbn = train_against_reference(CONV_SHAPES[0], 3, True, bind=False, steps=6)
    assert cbn.binding is not None and cbn.window_stats()['mean'].shape[0] == 2


def test_saved_input_under_a_checkpoint_is_left_alone_without_the_query(monkeypatch):
    """The same torch inside non-reentrant checkpointing: the saved input is held by the
    checkpoint's hook, so the layer does not read it (that would recompute the region)."""
    from mmcbn.layers.torch_features import saved_input_is_hooked
    monkeypatch.delattr(torch._C._autograd, '_top_saved_tensors_default_hooks', raising=False)
    conv = nn.Conv2d(3, 4, 3)
    seen = []

    def region(x):
        y = conv(x)
        seen.append(saved_input_is_hooked(y.grad_fn))
        return y

    torch.utils.checkpoint.checkpoint(region, torch.randn(2, 3, 8, 8, requires_grad=True),
                                      use_reentrant=False).sum().backward()
    free = conv(torch.randn(2, 3, 8, 8))
    assert seen[0] is True and saved_input_is_hooked(free.grad_fn) is False
    assert free.grad_fn._saved_input.shape == (2, 3, 8, 8)  # still readable after asking


def test_import_time_effects_are_undone_and_the_optimizer_hook_leaves_with_its_layers(
        monkeypatch):

    import mmengine.model
    import mmengine.runner.runner

    import mmcbn
    from layer_internals import isolate_optimizer_hook, optimizer_hook_registered
    mmcbn.uninstall_sync_bn_support()
    try:
        for namespace in (mmengine.model, mmengine.runner.runner):
            assert not hasattr(namespace.convert_sync_batchnorm, '__wrapped_by_mmcbn__')
        synced = mmengine.model.convert_sync_batchnorm(CrossIterationBatchNorm2d(4))
        assert type(synced) is torch.nn.SyncBatchNorm  # mmengine's own behaviour again
    finally:
        mmcbn.engine.sync_batchnorm.install()
    assert mmengine.model.convert_sync_batchnorm(CrossIterationBatchNorm2d(4)).sync
    # the process-wide optimizer hook follows the layers that need it, and leaves after them
    isolate_optimizer_hook(monkeypatch)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4))
    model[1].bind(model[0])
    assert optimizer_hook_registered()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert optimizer_hook_registered()  # the layer follows the steps
    convert_cbn_to_bn(model)  # unbinds: no layer left to follow
    assert not optimizer_hook_registered()


def test_a_layer_that_cannot_read_its_conv_input_says_so_once_and_reports_uncompensated():
    """A layer bound from the autograd graph while a saved-tensor hook holds every saved tensor
    (torch.autograd.graph.save_on_cpu over the whole training) cannot record derivatives: it
    says so once, naming the layer, and its diagnostics show uncompensated entries; a layer bound
    structurally is unaffected."""
    torch.manual_seed(0)
    lazy = CrossIterationBatchNorm2d(4, window_size=3)
    lazy.layer_name = 'neck.norm'
    bound = CrossIterationBatchNorm2d(4, window_size=3)
    conv_a, conv_b = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)
    bound.bind(conv_b)
    opt = torch.optim.SGD([*conv_a.parameters(), *conv_b.parameters()], lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for it in range(5):
            lazy.iteration = bound.iteration = it
            x = torch.randn(2, 3, 8, 8)
            with torch.autograd.graph.save_on_cpu():
                (lazy(conv_a(x)).square().mean() + bound(conv_b(x)).square().mean()).backward()
            opt.step()
            opt.zero_grad()
    messages = [str(w.message) for w in caught if 'could not read its input' in str(w.message)]
    assert len(messages) == 1 and "'neck.norm'" in messages[0], messages
    assert lazy.binding is not None
    assert not lazy.window_stats()['compensated'].any()
    assert bound.window_stats()['compensated'].all()
