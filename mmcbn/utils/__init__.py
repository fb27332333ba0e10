from .cpu_distributed import setup_cpu_distributed
from .data_check import DatasetNotFoundError, check_dataset_files

__all__ = ['DatasetNotFoundError', 'check_dataset_files', 'setup_cpu_distributed']
