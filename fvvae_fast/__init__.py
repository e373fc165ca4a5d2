"""fvvae_fast: fast Fisher vectors with a variational auto-encoder (FV-VAE, Qiu et al., CVPR 2017).

Public API (docs/api.rst)::

    G = fisher_accumulate(x, z, weight, bias, inv_var, offsets)   # (S, C, d+1) raw gradient sums
    model = FVVAE(in_dim=512, latent_dim=255, num_classes=101)
    fim = FisherInformation(mode="diagonal")                        # or "lowrank" (rank=k), "kronecker"
    fv = fisher_encode(model, x, offsets, fim=fim, normalize=True)  # (S, C*(d+1))
    descriptors = spp(maps)                                         # (B, C, 7, 7) -> (B, 50, C)
    model = load_official(path)                                     # the released UCF101 weights
    head = FisherVectorHead(model, fim)                             # the Fisher vector as a trainable layer
    enc = FVVAEEncoder(latent_dim=255).fit(sets, labels)            # scikit-learn transformer (needs scikit-learn)
"""

import importlib
import importlib.util
import sys
import types

# The public names and the module of each, imported on first use: `import fvvae_fast` (and `fvvae
# --help`) does not import torch until a name is used.
_EXPORTS = {
    "FVVAE": "model", "Losses": "model", "normalize_map": "model",
    "DescriptorSets": "sets",
    "FisherInformation": "fim",
    "FisherVectorHead": "head",
    "TrainConfig": "train", "TrainResult": "train", "load_model": "train", "save_checkpoint": "train", "train": "train",
    "fisher_accumulate": "ops", "fisher_vectors": "ops",
    "fisher_encode": "encode", "fisher_gradients": "encode", "power_l2_normalize": "encode", "signed_sqrt": "encode",
    "load_official": "official",
    "spp": "spp",
    "FVVAEEncoder": "sklearn",  # needs scikit-learn: not in __all__, so that `import *` works without it
}

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
    "fisher_vectors",
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


class _Package(types.ModuleType):
    """Resolves the public names lazily. The functions `train` and `spp` share their names with their
    modules: importing the module must not replace the function on the package."""

    def __getattr__(self, name: str):
        if name in _EXPORTS:
            value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
            types.ModuleType.__setattr__(self, name, value)
            return value
        if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
            return importlib.import_module(f".{name}", __name__)  # a sub-package: fvvae_fast.ops, .fim, ...
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __setattr__(self, name: str, value) -> None:
        if not (isinstance(value, types.ModuleType) and name in _EXPORTS and name == _EXPORTS[name]):
            types.ModuleType.__setattr__(self, name, value)

    def __dir__(self) -> list[str]:
        return sorted({*globals(), *_EXPORTS})


sys.modules[__name__].__class__ = _Package


def _ops_namespace(torch: types.ModuleType) -> None:
    """Makes ``torch.ops.fvvae_fast`` a namespace whose first lookup imports the ops, which register themselves."""
    from torch._ops import _OpNamespace

    class _Namespace(_OpNamespace):
        def __getattr__(self, name: str):
            if not name.startswith("_"):
                importlib.import_module(f"{__name__}.ops.training")  # with fvvae_fast.ops: every op
            return super().__getattr__(name)

    if "fvvae_fast" not in vars(torch.ops):
        torch.ops.fvvae_fast = _Namespace("fvvae_fast")


class _AfterTorchImport:
    """A one-off import hook: ``import torch`` runs as usual, then :func:`_ops_namespace` (so that ``import
    fvvae_fast`` still imports no torch, and ``torch.ops.fvvae_fast.*`` exist whichever is imported first)."""

    def find_spec(self, name: str, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_module(module: types.ModuleType) -> None:
                run(module)
                _ops_namespace(module)

            spec.loader.exec_module = exec_module
        return spec


if getattr(sys.modules.get("torch"), "ops", None) is not None:
    _ops_namespace(sys.modules["torch"])
elif "torch" not in sys.modules and not any(type(f).__name__ == "_AfterTorchImport" for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTorchImport())
