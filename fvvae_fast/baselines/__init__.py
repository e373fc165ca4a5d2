"""The paper's baselines (section 5.2, Table 2, Fig. 4), on the same sets of descriptors as FV-VAE.

Every encoder takes raw descriptors x (N, C) float with offsets (S+1,) int64 and returns one
vector per set, (S, D) float32; the protocol (:mod:`fvvae_fast.evaluation.protocol`) applies the
signed square root and L2 to all of them alike. ``GMMFisherVector`` and ``VLAD`` also take sets in
the forms of :func:`fvvae_fast.sets.pack_sets` with ``transform(X)`` (a list of (n_i, C) arrays, ...).

- :mod:`.pooling`: AVE, Concatenation, bilinear pooling (BP).
- :mod:`.gmm_fisher`: improved Fisher vectors on a diagonal GMM (scikit-learn ``GaussianMixture``).
- :mod:`.vlad`: VLAD on k-means centres (scikit-learn ``KMeans``).
- :mod:`.compression`: PCA and Random Maclaurin, applied to finished representations (Fig. 4(c)).

GA (the backbone's global feature) is not an encoding of the descriptors: the descriptor
sources produce it beside them.
"""

from .compression import PCACompression, RandomMaclaurin
from .gmm_fisher import GMMFisherVector
from .pooling import average_pool, bilinear_pool, concatenate
from .vlad import VLAD

__all__ = ["VLAD", "GMMFisherVector", "PCACompression", "RandomMaclaurin", "average_pool", "bilinear_pool",
           "concatenate"]
