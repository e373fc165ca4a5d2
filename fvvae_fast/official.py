"""The released FV-VAE model (fv-vae/fv-vae, MATLAB + Caffe): its weights and its preprocessing.

docs/math.rst, "The released model". The release extracts a frame's Fisher vector as

    image  -> RGB to BGR, resize to 240 x 320 (bilinear), centre crop 224, minus the
              Caffe BGR mean [104, 117, 123], 0-255 scale          (:func:`release_preprocess`)
    VGG-19 pool5 (7 x 7 x 512) -> map / ||map||_F * 158            (:func:`fvvae_fast.normalize_map`)
    SPP 2/1, 3/2, 4/3, 7/6 -> 50 descriptors x (512,)              (:func:`fvvae_fast.spp`)
    z = x We + be  (d = 256),  mu_x = ReLU(W z + b),  r = (mu_x - x) / sigma_x^2 * [mu_x > 0]
    frame FV = r^T [z, 1] (512 x 257) flattened column-major; video FV = mean of frame FVs

:func:`load_official` gives an :class:`~fvvae_fast.FVVAE` (``norm="map"``) whose
:func:`~fvvae_fast.fisher_encode` (``normalize=False``) on the same SPP descriptors is
minus that frame FV, in our row-major (C, d+1) order: ``ours = -release.reshape(d+1, C).T.ravel()``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .model import FVVAE

RELEASE_MEAN_BGR: tuple[float, float, float] = (104.0, 117.0, 123.0)
RELEASE_RESIZE: tuple[int, int] = (240, 320)  # (height, width)
RELEASE_CROP: int = 224
RELEASE_NORM_SCALE: float = 158.0


def _field(struct: np.ndarray, name: str, path: str, where: str):
    names = struct.dtype.names or ()
    if name not in names:
        raise ValueError(f"{path}: the .mat struct {where} has no field {name!r} "
                         f"(fields: {', '.join(names) or 'none'})")
    return struct[name]


def _layer(struct: np.ndarray, path: str, where: str) -> tuple[np.ndarray, np.ndarray, str]:
    w = np.asarray(_field(struct, "w", path, where), dtype=np.float64)
    b = np.asarray(_field(struct, "b", path, where), dtype=np.float64).reshape(-1)
    act = _field(struct, "act", path, where) if "act" in (struct.dtype.names or ()) else np.array(["Linear"])
    act = str(np.asarray(act).reshape(-1)[0]) if np.asarray(act).size else "Linear"
    if w.ndim == 4 and w.shape[:2] == (1, 1):  # Caffe InnerProduct as a 1x1 conv: (1, 1, rows, cols)
        w = w[0, 0]
    if w.ndim != 2:
        raise ValueError(f"{path}: {where}.w must be (1, 1, rows, cols) or (rows, cols), got shape {w.shape}")
    return w, b, act


def load_official(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> FVVAE:
    """Read one of the release's ``caffe_vae_weights_*.mat`` files into an :class:`FVVAE`.

    The returned model (eval mode) is configured like the release: ``norm="map"`` with
    ``norm_scale`` from the file (158), no per-descriptor normalisation, the file's encoder
    layers (one linear layer 512 -> 256 in the released files), the ReLU decoder read as
    ``decoder.w`` = (C=512, latent=256), and sigma_x = ``decoder_sigma`` (sigma itself, not
    its log). sigma_z is not in the file (inference only) and stays 1; there is no classifier.

    Its descriptors must come from :func:`~fvvae_fast.official.release_preprocess` + VGG-19 pool5 +
    :func:`fvvae_fast.normalize_map` (scale ``model.norm_scale``) + :func:`fvvae_fast.spp`;
    the video source does that with ``preprocess="release", map_scale=model.norm_scale``.

    Raises FileNotFoundError for a missing file and ValueError naming the file and field for
    anything that does not look like the release's struct.
    """
    import scipy.io

    path = os.fspath(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (expected one of the release's caffe_vae_weights_*.mat)")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as err:  # scipy raises several types for non-.mat input
        raise ValueError(f"{path}: not a readable MATLAB v5 .mat file ({type(err).__name__}: {err})") from None
    if "caffe_vae_weights" not in mat:
        keys = ", ".join(k for k in mat if not k.startswith("__"))
        raise ValueError(f"{path}: no struct 'caffe_vae_weights' in the file (variables: {keys or 'none'})")
    top = mat["caffe_vae_weights"].reshape(-1)[0]
    scale = float(np.asarray(_field(top, "norm_scale", path, "caffe_vae_weights")).reshape(-1)[0])
    encoders = np.asarray(_field(top, "encoder", path, "caffe_vae_weights")).reshape(-1)
    decoder = np.asarray(_field(top, "decoder", path, "caffe_vae_weights")).reshape(-1)[0]
    sigma = np.asarray(_field(top, "decoder_sigma", path, "caffe_vae_weights"), dtype=np.float64).reshape(-1)

    layers = [_layer(e, path, f"encoder({i + 1})") for i, e in enumerate(encoders)]
    if not layers:
        raise ValueError(f"{path}: caffe_vae_weights.encoder has no layer")
    for i, (_, _, act) in enumerate(layers):
        want = "Linear" if i == len(layers) - 1 else "ReLU"
        if act != want:
            raise ValueError(f"{path}: encoder({i + 1}).act is {act!r}; FVVAE needs ReLU hidden layers and a "
                             f"Linear last layer")
    # encoder: top = top * w + b with w (in, out)  ->  nn.Linear weight (out, in) = w^T
    in_dim = layers[0][0].shape[0]
    width = in_dim
    for i, (w, b, _) in enumerate(layers):
        if w.shape[0] != width or b.shape != (w.shape[1],):
            raise ValueError(f"{path}: encoder({i + 1}) has w {w.shape}, b {b.shape}; "
                             f"expected ({width}, out) and (out,)")
        width = w.shape[1]
    latent = width
    wd, bd, act = _layer(decoder, path, "decoder")
    if act != "ReLU":
        raise ValueError(f"{path}: decoder.act is {act!r}; FV-VAE's decoder is ReLU")
    # decoder: mu_x = z * w' + b with w (C, latent)  ->  nn.Linear weight (C, latent) = w
    if wd.shape != (in_dim, latent) or bd.shape != (in_dim,):
        raise ValueError(f"{path}: decoder.w {wd.shape} / b {bd.shape} do not match C={in_dim}, latent={latent}")
    if sigma.shape != (in_dim,) or not np.all(sigma > 0):
        raise ValueError(f"{path}: decoder_sigma must be ({in_dim},) positive values, got shape {sigma.shape}")

    hidden = [w.shape[1] for w, _, _ in layers[:-1]]
    model = FVVAE(in_dim=in_dim, latent_dim=latent, num_classes=0, hidden_dim=hidden or 0,
                  norm="map", norm_scale=scale, dropout=0.5).to(dtype)
    linears = [m for m in model.encoder if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for lin, (w, b, _) in zip(linears, layers):
            lin.weight.copy_(torch.from_numpy(w.T))  # float64 values of the file, cast once
            lin.bias.copy_(torch.from_numpy(b))
        model.decoder.weight.copy_(torch.from_numpy(wd))
        model.decoder.bias.copy_(torch.from_numpy(bd))
        model.log_sigma_x.copy_(torch.from_numpy(np.log(sigma)))
    return model.eval()


def _as_uint8_chw(images) -> Tensor:
    """PIL image, (H, W, 3) uint8 array, or (3, H, W) / (T, 3, H, W) uint8 tensor -> (T, 3, H, W) uint8 RGB."""
    if not isinstance(images, (Tensor, np.ndarray)):  # PIL
        images = np.array(images.convert("RGB"))
    if isinstance(images, np.ndarray):
        if images.ndim != 3 or images.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {images.shape}")
        images = torch.from_numpy(np.array(images, copy=True)).permute(2, 0, 1)
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (T, 3, H, W) or (3, H, W) RGB frames, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 frames (0-255), got {images.dtype}")
    return images


def center_crop(frames: Tensor, size: int) -> Tensor:
    """Crop (..., H, W) to (..., size, size) at offset floor((H - size) / 2), floor((W - size) / 2)."""
    h, w = frames.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"center_crop: frames of {h} x {w} are smaller than the crop {size}")
    top, left = (h - size) // 2, (w - size) // 2
    return frames[..., top : top + size, left : left + size]


def release_preprocess(
    images,
    size: Sequence[int] = RELEASE_RESIZE,
    crop: int | None = RELEASE_CROP,
    mean_bgr: Sequence[float] = RELEASE_MEAN_BGR,
) -> Tensor:
    """The release's image preprocessing: RGB frames -> (T, 3, crop, crop) float32 BGR Caffe input.

    RGB to BGR, resize to ``size`` = (240, 320) (height, width; aspect ratio not kept) by
    antialiased bilinear interpolation rounded to uint8 (the release uses MATLAB's
    ``imresize(..., 'bilinear')``, also antialiased, on uint8: values may differ by one grey
    level), centre crop ``crop`` (offsets floor((240-224)/2) = 8, floor((320-224)/2) = 48;
    ``None``: no crop), float in the 0-255 scale minus the BGR mean [104, 117, 123].

    images: a PIL image, an (H, W, 3) uint8 RGB array, or (3, H, W) / (T, 3, H, W) uint8 RGB tensors.
    For the backbone: VGG-19 converted from the release's Caffe model (BGR input).
    """
    from torchvision.transforms.v2 import functional as TF

    frames = _as_uint8_chw(images)
    frames = TF.resize(frames, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
    if crop is not None:
        frames = center_crop(frames, crop)
    bgr = frames.flip(1).to(torch.float32)
    return bgr - torch.tensor(list(mean_bgr), dtype=torch.float32, device=bgr.device).view(1, 3, 1, 1)
