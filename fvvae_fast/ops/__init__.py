"""The ``fisher_accumulate`` op: validation, reference, dispatcher, registration."""

from .fisher_accumulate import fisher_accumulate

__all__ = ["fisher_accumulate"]
