"""The ops ``fisher_accumulate``, ``fisher_vectors`` and ``sum_of_squares``: validation, references, dispatcher,
registration."""

from .fisher_accumulate import fisher_accumulate
from .fisher_vectors import fisher_vectors
from .sum_of_squares import sum_of_squares

__all__ = ["fisher_accumulate", "fisher_vectors", "sum_of_squares"]
