"""What every artefact was made from, and the checks between them.

Each artefact records fingerprints (SHA-256, hex) of its inputs, and each consumer compares them:

- a descriptor store: :meth:`fvvae_fast.store.Store.fingerprint` (its config, items and shards' checksums);
  its *kind*, :func:`descriptor_kind` (the settings that shape a descriptor: backbone, weights, layer,
  preprocessing, size, pyramid, modality; not the dataset, frame count or crops);
- a model: :func:`model_fingerprint` (its config and weights' bytes); a checkpoint records the
  :func:`data_record` of the descriptors it was trained on;
- a FIM: the fingerprint of the model it was estimated for; a Fisher-vector store: those of its
  descriptors, model and FIM.

Checkpoints and FIM files also carry :func:`payload_sha256` of their contents, checked on load
(:func:`seal`, :func:`verify`). Files of an earlier version, without these records, still load,
with one :class:`UnknownProvenance` notice each.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any

import numpy as np
import torch

from .errors import UserError

SHOWN = 12  # hex digits of a fingerprint shown in messages


class ProvenanceError(UserError, ValueError):
    """Inputs that were not made for each other (a model and another model's FIM, a checkpoint and other data)."""


class UnknownProvenance(UserWarning):
    """A file written by an earlier fvvae_fast: what it was made from is not recorded, so it is not checked."""

    one_line = True  # the command line prints it as one notice line


def short(fingerprint: str | None) -> str:
    return "unknown" if fingerprint is None else f"{fingerprint[:SHOWN]}..."


def mismatch(a: str, b: str) -> ProvenanceError:
    """The one-line refusal naming both sides: ``a`` and ``b`` describe each side with its fingerprint."""
    return ProvenanceError(f"{a}, {b}")


_NOTIFIED: set[str] = set()


def notice_unknown(path: str | os.PathLike, what: str) -> None:
    """Warn once per file and process that ``path`` (a ``what``) records no provenance or checksum."""
    key = os.path.realpath(path)
    if key not in _NOTIFIED:
        _NOTIFIED.add(key)
        warnings.warn(f"{os.fspath(path)}: a {what} of an earlier fvvae_fast version: what it was made from is "
                      f"unknown and not checked", UnknownProvenance, stacklevel=3)


# ---------------------------------------------------------------------------------------------- checksums


def _feed(h: Any, obj: Any) -> None:
    """Hash ``obj`` (dicts, lists, tensors, strings, numbers, None) with its structure and types."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key, value in sorted(obj.items(), key=lambda kv: repr(kv[0])):
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def payload_sha256(obj: Any) -> str:
    """SHA-256 (hex) over a payload of dicts (keys in sorted order), lists, tensors (dtype, shape, bytes),
    strings and numbers: the checksum a checkpoint or FIM file carries."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def seal(payload: dict) -> dict:
    """``payload`` with its ``checksum`` added (:func:`payload_sha256` of everything else)."""
    return {**payload, "checksum": payload_sha256(payload)}


def verify(payload: dict, path: str | os.PathLike, what: str) -> bool:
    """Check a loaded payload against its ``checksum``: ValueError naming ``path`` when they differ; False (and
    the notice of :func:`notice_unknown`) for a file of an earlier version without one; True when it matches."""
    recorded = payload.get("checksum")
    if recorded is None:
        notice_unknown(path, what)
        return False
    found = payload_sha256({k: v for k, v in payload.items() if k != "checksum"})
    if found != recorded:
        raise ValueError(f"{os.fspath(path)}: the {what}'s contents do not match its checksum (sha256 {short(found)}, "
                         f"recorded {short(recorded)}): the file changed after it was written")
    return True


# ---------------------------------------------------------------------------------------------- models


def _version_key(tensors: list[torch.Tensor]) -> tuple | None:
    """What changes whenever a tensor's values may have: its storage and version counter (None: not tracked,
    e.g. tensors made under ``torch.inference_mode()``)."""
    try:
        return tuple((t.data_ptr(), t._version, t.device.type) for t in tensors)
    except RuntimeError:
        return None


def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (hex) of a model's class, config (``model.config()`` when it has one) and state dict bytes.

    Cached on the model per version of its weights (each tensor's storage and version counter, which every
    in-place change such as an optimizer step or ``load_state_dict`` bumps): a repeated call costs a walk
    over the state dict, not a hash of the weights.
    """
    key = _version_key([*model.parameters(), *model.buffers()])
    cached = getattr(model, "_fvvae_fingerprint", None)
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    config = model.config() if callable(getattr(model, "config", None)) else None
    h = hashlib.sha256(f"{type(model).__name__}:{json.dumps(config, sort_keys=True)}".encode())
    _feed(h, dict(model.state_dict()))
    fingerprint = h.hexdigest()
    if key is not None:
        model._fvvae_fingerprint = (key, fingerprint)
    return fingerprint


def check_fim_model(fim: Any, model: torch.nn.Module, where: str, fim_name: str = "the FIM",
                    model_name: str = "this model") -> None:
    """ProvenanceError when ``fim`` records the fingerprint of another model than ``model`` (nothing to check
    when it records none: a FIM updated from raw G, or a file of an earlier version)."""
    recorded = getattr(fim, "model_fingerprint", None)
    if recorded is None:
        return
    found = model_fingerprint(model)
    if found != recorded:
        raise mismatch(f"{where}{': ' if where else ''}{fim_name} was estimated for another model (fingerprint "
                       f"{short(recorded)})", f"{model_name} is {short(found)}")


# ---------------------------------------------------------------------------------------------- descriptors

# settings of a descriptor store that do not change what a descriptor is: which items, how many frames of
# each, how they were decoded, where things were cached, the arithmetic of the backbone, the weights' file name
_NOT_KIND = {"stage", "dataset", "crops", "frames", "decoder", "flow_cache", "raft_weights", "use_box", "precision",
             "file"}


def _kind_part(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _kind_part(v) for k, v in value.items() if k not in _NOT_KIND}
    return value


def descriptor_kind(config: dict) -> str:
    """Fingerprint of what a descriptor store's descriptors are (from its config): the backbone, its weights'
    hash, layer, preprocessing, size, pyramid, modality; two stores of one kind suit one model."""
    return hashlib.sha256(json.dumps(_kind_part(config), sort_keys=True).encode()).hexdigest()


def describe(config: dict) -> str:
    """A short name of a descriptor store's kind for messages: 'resnet18/layer4 descriptors', 'precomputed
    descriptors'."""
    backbone = config.get("backbone") or {}
    source = (config.get("source") or {}).get("source", "precomputed")
    if not backbone:
        return f"{source} descriptors"
    return f"{backbone.get('arch')}/{backbone.get('layer')}{' flow' if source == 'flow' else ''} descriptors"


def check_trained_on(model: torch.nn.Module, name: str, config: dict, where: str) -> None:
    """ProvenanceError when the model of the checkpoint ``name`` was trained on another kind of descriptors
    (:func:`descriptor_kind`) than those of ``config``, held in ``where`` (nothing recorded: not checked)."""
    saved = getattr(model, "trained_on", None) or {}
    kind = descriptor_kind(config)
    if saved.get("kind") not in (None, kind):
        raise mismatch(f"{name} was trained on {saved['what']} (fingerprint {short(saved['kind'])})",
                       f"{where} holds {describe(config)} ({short(kind)})")


def _array_fingerprint(x: Any) -> str:
    """A fingerprint of descriptors x (N, C): a store's shard checksums and row ranges when x is read from one
    (:meth:`fvvae_fast.store.ShardedArray.fingerprint`), else the bytes of x."""
    own = getattr(x, "fingerprint", None)
    if callable(own):
        return own()
    h = hashlib.sha256()
    if isinstance(x, torch.Tensor):
        _feed(h, x)
    else:
        a = np.ascontiguousarray(x)
        h.update(f"A{a.dtype}{a.shape}".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def data_record(data: Any) -> dict:
    """What a checkpoint records of the :class:`~fvvae_fast.DescriptorSets` it was trained on (plain strings):
    ``fingerprint`` (descriptors, offsets, labels), and from a store's sets its ``kind`` (:func:`descriptor_kind`),
    ``what`` (:func:`describe`) and ``store`` (its folder)."""
    h = hashlib.sha256(_array_fingerprint(data.x).encode())
    _feed(h, [data.offsets, data.labels])
    origin = getattr(data.x, "origin", None) or {}
    return {"fingerprint": h.hexdigest(), "kind": origin.get("kind"),
            "what": origin.get("what", "descriptors in memory"), "store": origin.get("store")}
