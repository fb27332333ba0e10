"""Training-loop side: CBNHook and precise re-estimation of the running statistics."""
from .hooks import CBNHook
from .precise_stats import PreciseStatsReport, loader_batches, recompute_running_stats

__all__ = ['CBNHook', 'PreciseStatsReport', 'loader_batches', 'recompute_running_stats']
