"""fvvae_fast: fast Fisher vectors with a variational auto-encoder (FV-VAE, Qiu et al., CVPR 2017)."""

from .ops import fisher_accumulate

__all__ = ["fisher_accumulate"]
__version__ = "0.1.0"
