"""Argument checks whose errors name the argument and the allowed values."""
import math


def check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    """Raises TypeError/ValueError unless ``value`` is an int >= ``minimum`` (or None if allowed)."""
    if allow_none and value is None:
        return
    allowed = f'{"None or " if allow_none else ""}an int >= {minimum}'
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'{name} must be {allowed}, got {value!r}')
    if value < minimum:
        raise ValueError(f'{name} must be {allowed}, got {value}')


def check_number(name: str, value, positive: bool = False) -> None:
    """Raises TypeError/ValueError unless ``value`` is a finite real number (> 0 if
    ``positive``)."""
    allowed = 'a finite number' + (' > 0' if positive else '')
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f'{name} must be {allowed}, got {value!r}')
    if not math.isfinite(value) or (positive and not value > 0):
        raise ValueError(f'{name} must be {allowed}, got {value}')


def check_process_group(name: str, value) -> None:
    """Raises TypeError unless ``value`` is None or a ``torch.distributed`` process group."""
    if value is None:
        return
    import torch.distributed as dist
    group_type = getattr(dist, 'ProcessGroup', None) if dist.is_available() else None
    if group_type is None or not isinstance(value, group_type):
        raise TypeError(f'{name} must be None (the default group) or a torch.distributed '
                        f'ProcessGroup (e.g. from dist.new_group), got {value!r}')


def check_bool(name: str, value, allow_none: bool = False) -> None:
    """Raises TypeError unless ``value`` is True or False (or None if allowed)."""
    if not isinstance(value, bool) and not (allow_none and value is None):
        raise TypeError(f'{name} must be {"None, " if allow_none else ""}True or False, '
                        f'got {value!r}')


def check_choice(name: str, value, choices) -> None:
    """Raises ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f'{name} must be one of {tuple(choices)}, got {value!r}')
