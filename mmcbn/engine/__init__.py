from .hooks import CBNHook
from .precise_stats import PreciseStatsReport, recompute_running_stats

__all__ = ['CBNHook', 'PreciseStatsReport', 'recompute_running_stats']
