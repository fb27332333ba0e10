"""Helpers for the tools: CPU distributed launch, dataset checks, argument checks."""
from .cpu_distributed import finish_distributed, setup_cpu_distributed
from .data_check import DatasetNotFoundError, check_dataset_files
from .tool_config import load_tool_config

__all__ = [
    'DatasetNotFoundError', 'check_dataset_files', 'finish_distributed', 'load_tool_config',
    'setup_cpu_distributed'
]
