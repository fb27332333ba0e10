from .hooks import CBNHook
from .precise_stats import PreciseStatsReport, loader_batches, recompute_running_stats

__all__ = ['CBNHook', 'PreciseStatsReport', 'loader_batches', 'recompute_running_stats']
