"""The embedded demo data."""
from .shapes import CLASSES, generate_shapes, is_complete

__all__ = ['CLASSES', 'generate_shapes', 'is_complete']
