from .data_check import DatasetNotFoundError, check_dataset_files

__all__ = ['DatasetNotFoundError', 'check_dataset_files']
