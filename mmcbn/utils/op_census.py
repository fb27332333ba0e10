"""Counting what a step dispatches: every compute op (aten, forward and backward) and every call
that exchanges data with the host. For the census test and ``tools/benchmark.py --census``."""
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# ops that read device data back to the host, make a tensor from host data, or have an output
# whose shape depends on the data: each would stall a CUDA stream
STALLING = {'_local_scalar_dense', 'item', 'lift_fresh', 'lift_fresh_copy', 'nonzero',
            'nonzero_static', 'masked_select', 'is_nonzero', 'equal', 'allclose', '_unique',
            '_unique2', 'unique_dim', 'unique_consecutive', 'bincount', 'repeat_interleave'}
NOT_KERNELS = {'empty', 'empty_like', 'empty_strided', 'new_empty', 'new_empty_strided',
               'detach', 'alias', 'lift', '_unsafe_view', 'promote_types'}


# Python-level calls that move host data to the device or device data to the host (on the CPU the
# dispatcher sees no copy for them)
HOST_DATA_CALLS = {torch.tensor, torch.as_tensor, torch.from_numpy, torch.Tensor.tolist,
                   torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__,
                   torch.Tensor.__int__, torch.Tensor.numpy, torch.Tensor.cpu}


def _has_sequence(index) -> bool:
    """Whether an index holds a Python list (made into a tensor from host data)."""
    return isinstance(index, list) or (
        isinstance(index, tuple) and any(isinstance(i, (list, tuple)) for i in index))


class HostDataCalls(TorchFunctionMode):
    """Records calls that exchange data with the host, and indexing with Python sequences."""

    def __init__(self, ops):
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_DATA_CALLS:
            self.ops.append(f'host:{getattr(func, "__name__", func)}')
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and \
                _has_sequence(args[1]):
            self.ops.append('host:index with a Python sequence')
        return func(*args, **(kwargs or {}))


class OpCensus(TorchDispatchMode):
    """Records, in order, the compute ops dispatched while active and the host-data calls."""

    def __init__(self):
        super().__init__()
        self.ops = []
        self._host = HostDataCalls(self.ops)

    def __enter__(self):
        self._host.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._host.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in NOT_KERNELS and \
                torch.Tag.inplace_view not in func.tags:
            if name == 'index' and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                       for i in args[1] if i is not None):
                name = 'index with a mask'  # a boolean mask index is a nonzero
                STALLING.add(name)
            self.ops.append(name)
        return func(*args, **(kwargs or {}))
