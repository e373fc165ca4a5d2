"""What the stage jobs (:mod:`.jobs`) share: the device option, loading a model (and its FIM), the report of a
job that writes one file."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

from ..io import file_sha256
from ..model import FVVAE
from ..provenance import check_fim_model
from .options import JobError, integer, option

TRAIN_SPLITS = ("train", "training")  # UCF101/CUB/folders, ActivityNet

_MODEL = inspect.signature(FVVAE).parameters
_positive = integer(1)


def device_of(name: str) -> str:
    """'auto' (cuda when available, else cpu) or a torch device name that exists here."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise JobError(f"device (--device) {name!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise JobError(f"device (--device) {name}: CUDA is not available on this machine")
    return name


def _device_option():
    return option("auto", "torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")


def load_any_model(path: str) -> FVVAE:
    """An FV-VAE from a checkpoint of `fvvae train` or from the release's .mat file."""
    from ..official import load_official
    from ..train import load_model

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: model file not found")
    return load_official(p) if p.suffix.lower() == ".mat" else load_model(p)


@dataclass
class JobReport:
    """What a job that writes one file did: the lines it reports and its figures (JSON values)."""

    messages: list[str]
    values: dict

    def lines(self) -> list[str]:
        return self.messages

    def figures(self) -> dict:
        return self.values


def load_model_and_fim(model: str, fim: str | None):
    """The FV-VAE of a checkpoint or .mat file and the FisherInformation of a FIM file (or None)."""
    if fim is None:
        return load_any_model(model), None
    from ..fim import FisherInformation

    if not Path(fim).is_file():
        raise FileNotFoundError(f"{fim}: FIM file not found")
    estimate = FisherInformation.load(fim)
    if estimate.num_sets == 0:
        raise JobError(f"{fim}: the FIM file holds no estimate (saved before any update); make it with `fvvae fim`")
    net = load_any_model(model)
    check_fim_model(estimate, net, "", fim, model)
    return net, estimate


def provenance(model: str, fim: str | None) -> dict:
    """The SHA-256 of the model (and FIM) file a Fisher-vector store was made with."""
    return {"model_sha256": file_sha256(model), **({"fim_sha256": file_sha256(fim)} if fim else {})}
