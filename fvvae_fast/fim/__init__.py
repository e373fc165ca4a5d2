"""Streaming, mergeable Fisher information estimates (paper Eq. 12-13; docs/math.rst, "The Fisher information").

    fim = FisherInformation(mode="diagonal")          # or mode="lowrank", rank=k; mode="kronecker"
    fim.estimate(model, loader)                        # one pass over the training sets
    W = fim.whiten(G)                                  # (S, D) = F^(-1/2) vec(G)

Modules: :mod:`.estimator` (the API), :mod:`.statistics` (what a mode implements), and one
module per mode, its maths and its statistics: :mod:`.diagonal`, :mod:`.lowrank` (Frequent
Directions), :mod:`.kronecker`.
"""

from .estimator import DEFAULT_DAMPING, FisherInformation

__all__ = ["DEFAULT_DAMPING", "FisherInformation"]
