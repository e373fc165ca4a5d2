"""fvvae_fast: fast Fisher vectors with a variational auto-encoder (FV-VAE, Qiu et al., CVPR 2017).

Public API (DESIGN section 3)::

    G = fisher_accumulate(x, z, weight, bias, inv_var, offsets)   # (S, C, d+1) raw gradient sums
    model = FVVAE(in_dim=512, latent_dim=255, num_classes=101)
    fim = FisherInformation(mode="diagonal")                        # or "lowrank" (rank=k), "kronecker"
    fv = fisher_encode(model, x, offsets, fim=fim, normalize=True)  # (S, C*(d+1))
    descriptors = spp(maps)                                         # (B, C, 7, 7) -> (B, 50, C)
    model = load_official(path)                                     # the released UCF101 weights
    head = FisherVectorHead(model, fim)                             # the Fisher vector as a trainable layer
    enc = FVVAEEncoder(latent_dim=255).fit(sets, labels)            # scikit-learn transformer (needs scikit-learn)
"""

from .encode import fisher_encode, fisher_gradients, power_l2_normalize, signed_sqrt
from .fim import FisherInformation
from .head import FisherVectorHead
from .model import FVVAE, Losses, normalize_map
from .official import load_official
from .ops import fisher_accumulate
from .sets import DescriptorSets
from .spp import spp
from .train import TrainConfig, TrainResult, load_model, save_checkpoint, train

__all__ = [
    "FVVAE",
    "DescriptorSets",
    "FisherInformation",
    "FisherVectorHead",
    "Losses",
    "TrainConfig",
    "TrainResult",
    "fisher_accumulate",
    "fisher_encode",
    "fisher_gradients",
    "load_model",
    "load_official",
    "normalize_map",
    "power_l2_normalize",
    "save_checkpoint",
    "signed_sqrt",
    "spp",
    "train",
]
__version__ = "0.1.0"  # the one place: setup.py and `fvvae --version` read it


def __getattr__(name: str):
    # FVVAEEncoder is imported on first use: scikit-learn is an optional dependency. It is not in
    # __all__, so that `from fvvae_fast import *` works without scikit-learn.
    if name == "FVVAEEncoder":
        from .sklearn import FVVAEEncoder

        return FVVAEEncoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "FVVAEEncoder"])
