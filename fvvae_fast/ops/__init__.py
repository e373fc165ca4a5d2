"""The ops ``fisher_accumulate`` and ``sum_of_squares``: validation, references, dispatcher, registration."""

from .fisher_accumulate import fisher_accumulate
from .sum_of_squares import sum_of_squares

__all__ = ["fisher_accumulate", "sum_of_squares"]
