"""Optional tensors kept as plain attributes (not buffers), moved and counted together."""
from typing import Tuple


class ScratchTensors:
    """Mixin for holders of per-layer scratch tensors: the attributes named in ``tensor_names``
    are each a tensor or None."""

    tensor_names: Tuple[str, ...] = ()

    def to_(self, device) -> None:
        """Moves the held tensors to ``device`` (their dtypes stay as they are)."""
        for name in self.tensor_names:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device))

    def follow(self, device, dtype) -> None:
        """Moves the held tensors to ``device``, or forgets them all (``clear()``) when the first
        of ``tensor_names`` is not of ``dtype``."""
        first = getattr(self, self.tensor_names[0])
        if first is None:
            return
        if first.dtype != dtype:
            self.clear()
        else:
            self.to_(device)

    def nbytes(self) -> int:
        """Bytes of tensor storage held."""
        return sum(t.numel() * t.element_size()
                   for t in (getattr(self, name) for name in self.tensor_names) if t is not None)
