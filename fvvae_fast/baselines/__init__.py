"""The paper's baselines (section 5.2, Table 2, Fig. 4), on the same sets of descriptors as FV-VAE.

Every encoder takes raw descriptors x (N, C) float with offsets (S+1,) int64 and returns one
vector per set, (S, D) float32; the protocol (:mod:`fvvae_fast.evaluation.protocol`) applies the
signed square root and L2 to all of them alike. ``GMMFisherVector``, ``VLAD``, ``AveragePooling``,
``Concatenation`` and ``BilinearPooling`` are also scikit-learn transformers of sets (``fit(X)``,
``transform(X)`` for X in the forms of :func:`fvvae_fast.sets.pack_sets`), interchangeable with
:class:`fvvae_fast.FVVAEEncoder` in a ``Pipeline``. The package needs scikit-learn.

- :mod:`.pooling`: AVE, Concatenation, bilinear pooling (BP).
- :mod:`.gmm_fisher`: improved Fisher vectors on a diagonal GMM (scikit-learn ``GaussianMixture``).
- :mod:`.vlad`: VLAD on k-means centres (scikit-learn ``KMeans``).
- :mod:`.compression`: PCA and Random Maclaurin, applied to finished representations (Fig. 4(c)).

GA (the backbone's global feature) is not an encoding of the descriptors: the descriptor
sources produce it beside them.
"""

from .compression import PCACompression, RandomMaclaurin
from .gmm_fisher import GMMFisherVector
from .pooling import AveragePooling, BilinearPooling, Concatenation, average_pool, bilinear_pool, concatenate
from .vlad import VLAD

__all__ = ["VLAD", "AveragePooling", "BilinearPooling", "Concatenation", "GMMFisherVector", "PCACompression",
           "RandomMaclaurin", "average_pool", "bilinear_pool", "concatenate"]
