"""The released model: load_official, the release's preprocessing, and our Fisher vectors against a
line-by-line NumPy transcription of the release's math (docs/math.rst, "The released model")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from fvvae_fast.encode import fisher_encode
from fvvae_fast.official import RELEASE_MEAN_BGR, load_official, release_preprocess
from fvvae_fast.pipelines.sources import VideoSource

OFFICIAL = Path(__file__).resolve().parents[2] / "shared" / "official"
if not OFFICIAL.is_dir():
    OFFICIAL = Path("/work/shared/official")
MAT_FILES = sorted(OFFICIAL.glob("caffe_vae_weights_*.mat"))
FRAMES = sorted((OFFICIAL / "example_frames").glob("*.jpg"))
pytestmark = pytest.mark.skipif(not MAT_FILES, reason=f"released weights not found in {OFFICIAL}")


# ------------------------------------------------------------------ the release, transcribed in NumPy


def release_weights(path: Path) -> dict:
    s = scipy.io.loadmat(path)["caffe_vae_weights"][0, 0]
    enc, dec = s["encoder"][0, 0], s["decoder"][0, 0]
    return {
        "norm_scale": float(s["norm_scale"][0, 0]),
        "We": enc["w"].reshape(enc["w"].shape[2], enc["w"].shape[3]).astype(np.float64),  # (512, 256)
        "be": enc["b"][:, 0].astype(np.float64),
        "Wd": dec["w"].reshape(dec["w"].shape[2], dec["w"].shape[3]).astype(np.float64),  # (512, 256)
        "bd": dec["b"][:, 0].astype(np.float64),
        "sig": s["decoder_sigma"][:, 0].astype(np.float64),
    }


def release_spp(act: np.ndarray) -> np.ndarray:
    """act: (W, H, C), the release's Caffe-in-MATLAB layout -> (50, C), column-major reshapes."""
    c = act.shape[2]
    levels = []
    for n, k, s in ((6, 2, 1), (3, 3, 2), (2, 4, 3), (1, 7, 6)):
        p = np.zeros((n, n, c))
        for w in range(n):
            for h in range(n):
                p[w, h] = act[w * s : w * s + k, h * s : h * s + k].max(axis=(0, 1))
        levels.append(p.reshape(n * n, c, order="F"))
    return np.concatenate(levels)


def release_frame_fv(pool5: np.ndarray, wts: dict) -> np.ndarray:
    """One frame: pool5 (C, 7, 7) in torch layout -> raw FV (C * 257,) flattened column-major."""
    act = pool5.transpose(2, 1, 0)  # (W, H, C)
    act = act / np.sqrt(act.ravel() @ act.ravel()) * wts["norm_scale"]  # whole-map L2 x 158
    xt = release_spp(act)  # (50, C)
    zt = xt @ wts["We"] + wts["be"]  # one linear encoder layer, d = 256
    uxt = zt @ wts["Wd"].T + wts["bd"]
    uxt = uxt * (uxt > 0)  # ReLU decoder
    fv_mat = ((uxt - xt) / (wts["sig"] * wts["sig"]) * (uxt > 0)).T @ np.hstack([zt, np.ones((len(zt), 1))])
    return fv_mat.ravel(order="F")  # MATLAB's fv_mat(:)


def release_video_fv(pool5_frames: np.ndarray, wts: dict) -> np.ndarray:
    return np.mean([release_frame_fv(f, wts) for f in pool5_frames], axis=0)  # mean of frame FVs


def normalize_raw_fv(raw: np.ndarray) -> np.ndarray:
    eps = 1e-10
    fv = raw / np.maximum(np.sqrt((raw * raw).sum(0)), eps)  # column L2 (diagonal FIM)
    fv = np.sign(fv) * np.sqrt(np.abs(fv))  # signed sqrt
    return fv / np.maximum(np.sqrt((fv * fv).sum(1, keepdims=True)), eps)  # row L2


def to_row_major(release_fv: np.ndarray, c: int) -> np.ndarray:
    """The release's column-major vec of (C, d+1) -> our row-major vec."""
    return release_fv.reshape(c, -1, order="F").ravel()


def pool5_like(n: int, seed: int) -> np.ndarray:
    """Sparse non-negative (n, 512, 7, 7) maps, like VGG-19 pool5 after ReLU."""
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal((n, 512, 7, 7)) * 3.0 - 1.5, 0.0)


def our_descriptors(maps: torch.Tensor, model) -> torch.Tensor:
    """The video source's descriptor path with the release's options: (T, 512, 7, 7) -> (T * 50, 512)."""
    source = VideoSource(preprocess="release", map_scale=model.norm_scale)
    return source.descriptors(maps).reshape(-1, maps.shape[1])


# ------------------------------------------------------------------ tests


@pytest.mark.parametrize("path", MAT_FILES, ids=lambda p: p.stem.split("_")[-2])
def test_load_official_config(path):
    model = load_official(path)
    wts = release_weights(path)
    assert model.in_dim == 512 and model.latent_dim == 256 and model.hidden_dims == ()
    assert model.norm == "map" and model.norm_scale == 158.0 and model.classifier is None
    assert not model.training
    lin = model.encoder[0]
    torch.testing.assert_close(lin.weight.double(), torch.from_numpy(wts["We"].T), rtol=0, atol=0)
    torch.testing.assert_close(model.decoder.weight.double(), torch.from_numpy(wts["Wd"]), rtol=0, atol=0)
    torch.testing.assert_close(model.inv_var().double(), torch.from_numpy(1 / wts["sig"] ** 2), rtol=1e-6, atol=0)
    assert model(torch.rand(3, 512)).shape == (3, 256)


def test_frame_fvs_match_the_release_float64():
    path = MAT_FILES[0]
    wts = release_weights(path)
    model = load_official(path, dtype=torch.float64)
    maps = pool5_like(4, seed=0)
    x = our_descriptors(torch.from_numpy(maps), model)
    offsets = torch.arange(5, dtype=torch.int64) * 50  # one set per frame
    with torch.inference_mode():
        ours = fisher_encode(model, x, offsets, normalize=False).numpy()
    assert ours.shape == (4, 512 * 257)
    for t in range(4):
        ref = to_row_major(release_frame_fv(maps[t], wts), 512)
        np.testing.assert_allclose(ours[t], -ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())


def test_video_fvs_and_normalize_raw_fv_match_the_release():
    from fvvae_fast.fim import FisherInformation

    path = MAT_FILES[0]
    wts = release_weights(path)
    model = load_official(path, dtype=torch.float64)
    videos, frames = 5, 3
    maps = pool5_like(videos * frames, seed=1).reshape(videos, frames, 512, 7, 7)
    raw = np.stack([release_video_fv(v, wts) for v in maps])  # (videos, D), column-major vecs
    release = normalize_raw_fv(raw)
    x = our_descriptors(torch.from_numpy(maps.reshape(-1, 512, 7, 7)), model)  # one video = one set
    offsets = torch.arange(videos + 1, dtype=torch.int64) * frames * 50
    with torch.inference_mode():
        from fvvae_fast.encode import fisher_gradients

        fim = FisherInformation(mode="diagonal", damping=0.0).update(fisher_gradients(model, x, offsets))
        ours = fisher_encode(model, x, offsets, fim=fim).numpy()
        plain = fisher_encode(model, x, offsets, normalize=False).numpy()
    for v in range(videos):
        np.testing.assert_allclose(plain[v], -frames * to_row_major(raw[v], 512), rtol=1e-9,
                                   atol=1e-9 * np.abs(raw[v]).max() * frames)
        np.testing.assert_allclose(ours[v], -to_row_major(release[v], 512), rtol=1e-7, atol=1e-9)


def test_float32_pipeline_close_to_the_release():
    path = MAT_FILES[1 % len(MAT_FILES)]
    wts = release_weights(path)
    model = load_official(path)
    maps = pool5_like(2, seed=2)
    x = our_descriptors(torch.from_numpy(maps).float(), model)
    with torch.inference_mode():
        ours = fisher_encode(model, x, torch.tensor([0, 50, 100]), normalize=False).numpy()
    for t in range(2):
        ref = to_row_major(release_frame_fv(maps[t], wts), 512)
        np.testing.assert_allclose(ours[t], -ref, rtol=2e-3, atol=2e-4 * np.abs(ref).max())


def release_preprocess_numpy(rgb_240x320: np.ndarray) -> np.ndarray:
    """The release's conversion of an image already 240 x 320 (imresize is then the identity),
    in torch's (3, H, W) layout: BGR, crop at (floor(16/2), floor(96/2)), minus the mean."""
    bgr = rgb_240x320[:, :, ::-1].astype(np.float32)
    crop = bgr[8 : 8 + 224, 48 : 48 + 224]
    return (crop - np.array(RELEASE_MEAN_BGR, dtype=np.float32)).transpose(2, 0, 1)


def test_release_preprocess_exact_on_240x320():
    rgb = np.random.default_rng(3).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    out = release_preprocess(rgb)
    assert out.shape == (1, 3, 224, 224) and out.dtype == torch.float32
    np.testing.assert_array_equal(out[0].numpy(), release_preprocess_numpy(rgb))


@pytest.mark.skipif(not FRAMES, reason="example frames not found")
def test_example_frames_end_to_end():
    """The 10 real UCF101 frames of the release: preprocessing (resize matches PIL's antialiased
    bilinear within one grey level), a small fixed conv net giving 512 x 7 x 7 maps, and our
    video Fisher vector equal to the transcription's mean of frame FVs."""
    from PIL import Image

    images = [Image.open(f).convert("RGB") for f in FRAMES]
    batch = torch.cat([release_preprocess(im) for im in images])
    assert batch.shape == (10, 3, 224, 224)
    pil = np.asarray(images[0].resize((320, 240), Image.BILINEAR))
    diff = np.abs(batch[0].numpy() - release_preprocess_numpy(pil))
    assert diff.max() <= 1.0 + 1e-6 and diff.mean() < 0.05
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 512, kernel_size=32, stride=32).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=torch.float64) * 1e-3)
        conv.bias.zero_()
        maps = torch.relu(conv(batch.double()))  # (10, 512, 7, 7), a stand-in for VGG-19 pool5
    path = MAT_FILES[0]
    wts = release_weights(path)
    model = load_official(path, dtype=torch.float64)
    x = our_descriptors(maps, model)
    with torch.inference_mode():
        video = fisher_encode(model, x, torch.tensor([0, x.shape[0]]), normalize=False)[0].numpy()
    ref = release_video_fv(maps.numpy(), wts)
    np.testing.assert_allclose(video / len(FRAMES), -to_row_major(ref, 512), rtol=1e-9, atol=1e-9 * np.abs(ref).max())


def test_load_official_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_official(tmp_path / "missing.mat")
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(ValueError, match="bad.mat"):
        load_official(bad)
    other = tmp_path / "other.mat"
    scipy.io.savemat(other, {"weights": np.ones(3)})
    with pytest.raises(ValueError, match="caffe_vae_weights"):
        load_official(other)
