"""fvvae_fast: fast Fisher vectors with a variational auto-encoder (FV-VAE, Qiu et al., CVPR 2017).

Public API (DESIGN section 3)::

    G = fisher_accumulate(x, z, weight, bias, inv_var, offsets)   # (S, C, d+1) raw gradient sums
    model = FVVAE(in_dim=512, latent_dim=255, num_classes=101)
    fv = fisher_encode(model, x, offsets, fim=None, normalize=True)  # (S, C*(d+1))
"""

from .encode import fisher_encode, fisher_gradients, power_l2_normalize
from .model import FVVAE, Losses, normalize_map
from .ops import fisher_accumulate
from .sets import DescriptorSets
from .train import TrainConfig, TrainResult, load_model, save_checkpoint, train

__all__ = [
    "FVVAE",
    "DescriptorSets",
    "Losses",
    "TrainConfig",
    "TrainResult",
    "fisher_accumulate",
    "fisher_encode",
    "fisher_gradients",
    "load_model",
    "normalize_map",
    "power_l2_normalize",
    "save_checkpoint",
    "train",
]
__version__ = "0.1.0"
