"""Every baseline encoder against a direct, slow per-set computation on tiny awkward inputs."""

from __future__ import annotations

import math

import pytest
import torch

from fvvae_fast.baselines import (
    VLAD,
    GMMFisherVector,
    PCACompression,
    RandomMaclaurin,
    average_pool,
    bilinear_pool,
    concatenate,
)

from .cases import generator

LENGTHS = [(3, 1, 0, 5), (4,), (2, 2, 2)]  # an empty set, a one-row set, equal lengths


def _sets(lengths, c=5, salt=0):
    g = generator(salt)
    x = torch.rand(sum(lengths), c, generator=g)
    offsets = torch.tensor((0, *lengths)).cumsum(0)
    return x, offsets


def _each(x, offsets):
    b = offsets.tolist()
    return [x[lo:hi].double() for lo, hi in zip(b[:-1], b[1:])]


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_average_and_bilinear(lengths):
    x, off = _sets(lengths)
    ave, bp = average_pool(x, off), bilinear_pool(x, off)
    for s, xs in enumerate(_each(x, off)):
        n = max(len(xs), 1)
        want_ave = xs.sum(0) / n
        want_bp = sum((torch.outer(r, r) for r in xs), torch.zeros(5, 5, dtype=torch.float64)) / n
        torch.testing.assert_close(ave[s].double(), want_ave, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(bp[s].double(), want_bp.flatten(), atol=1e-6, rtol=1e-5)


def test_concatenate_needs_equal_lengths():
    x, off = _sets((2, 2, 2))
    torch.testing.assert_close(concatenate(x, off)[1], x[2:4].flatten())
    with pytest.raises(ValueError, match="same number of descriptors"):
        concatenate(*_sets((2, 3)))


@pytest.mark.parametrize("bad", ["rank", "offsets-end", "offsets-dtype"])
def test_bad_input_is_refused(bad):
    x, off = _sets((2, 3))
    if bad == "rank":
        x = x[None]
    elif bad == "offsets-end":
        off = torch.tensor([0, 2, 4])
    else:
        off = off.int()
    with pytest.raises(ValueError):
        average_pool(x, off)


@pytest.mark.parametrize("weights", [False, True], ids=["mean-variance", "with-weights"])
@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_gmm_fisher_vector_matches_direct(lengths, weights):
    train, _ = _sets((60,), salt=1)
    enc = GMMFisherVector(components=3, weights=weights, seed=0).fit([train])
    x, off = _sets(lengths)
    fv = enc.encode(x, off)
    assert fv.shape == (len(lengths), 2 * 3 * 5 + 3 * weights) and len(enc.get_feature_names_out()) == 30 + 3 * weights
    w, mu, sd = (t.double() for t in (enc.weights_, enc.means_, enc.sigmas_))
    for s, xs in enumerate(_each(x, off)):
        t = max(len(xs), 1)
        # posteriors by the textbook density, one descriptor and one component at a time
        dens = torch.stack([torch.stack([w[k] * torch.exp(-0.5 * (((r - mu[k]) / sd[k]) ** 2).sum())
                                         / torch.prod(sd[k] * math.sqrt(2 * math.pi)) for k in range(3)])
                            for r in xs]) if len(xs) else torch.zeros(0, 3, dtype=torch.float64)
        gamma = dens / dens.sum(1, keepdim=True)
        g_mu = torch.stack([sum((gamma[i, k] * (xs[i] - mu[k]) / sd[k] for i in range(len(xs))),
                                torch.zeros(5, dtype=torch.float64)) / (t * w[k].sqrt()) for k in range(3)])
        g_sd = torch.stack([sum((gamma[i, k] * (((xs[i] - mu[k]) / sd[k]) ** 2 - 1) for i in range(len(xs))),
                                torch.zeros(5, dtype=torch.float64)) / (t * (2 * w[k]).sqrt()) for k in range(3)])
        g_w = torch.stack([sum((gamma[i, k] - w[k] for i in range(len(xs))), torch.zeros((), dtype=torch.float64))
                           / (t * w[k].sqrt()) for k in range(3)])
        want = torch.cat([g_w] * weights + [g_mu.flatten(), g_sd.flatten()])
        torch.testing.assert_close(fv[s].double(), want, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("weights", [False, True], ids=["mean-variance", "with-weights"])
def test_gmm_fisher_vector_matches_scikit_image(weights):
    """scikit-image's ``fisher_vector`` on the same GMM (scikit-learn's, same seed): its weight terms first,
    then the mean terms, then the variance terms with the opposite sign (its d_sigma is sigma^2 - (x - mu)^2)."""
    feature = pytest.importorskip("skimage.feature")
    from sklearn.mixture import GaussianMixture

    train, _ = _sets((60,), salt=1)
    enc = GMMFisherVector(components=3, weights=weights, seed=0).fit([train])
    gmm = GaussianMixture(3, covariance_type="diag", reg_covar=1e-6, random_state=0).fit(train.double().numpy())
    x, off = _sets((3, 1, 7), salt=4)
    fv = enc.encode(x, off).double()
    k, kc = 3, 3 * 5
    for s, xs in enumerate(_each(x, off)):
        ref = torch.from_numpy(feature.fisher_vector(xs.numpy(), gmm))
        want = torch.cat([ref[:k]] * weights + [ref[k : k + kc], -ref[k + kc :]])
        torch.testing.assert_close(fv[s], want, atol=2e-4, rtol=1e-3)
    with pytest.raises(TypeError, match="weights must be True or False, got 1"):
        GMMFisherVector(components=3, weights=1).fit([train])


@pytest.mark.parametrize("lengths", LENGTHS, ids=str)
def test_vlad_matches_direct(lengths):
    train, _ = _sets((40,), salt=2)
    enc = VLAD(centres=4, seed=0).fit([train])
    x, off = _sets(lengths)
    v = enc.encode(x, off)
    assert v.shape == (len(lengths), 4 * 5)
    c = enc.centres_.double()
    for s, xs in enumerate(_each(x, off)):
        want = torch.zeros(4, 5, dtype=torch.float64)
        for r in xs:
            k = int(((c - r) ** 2).sum(1).argmin())
            want[k] += r - c[k]
        torch.testing.assert_close(v[s].double(), want.flatten(), atol=1e-5, rtol=1e-5)


def test_compression():
    g = generator(3)
    v = torch.randn(30, 12, generator=g)
    pca = PCACompression(4).fit(v)
    out = pca.transform(v)
    centred = (v - v.mean(0)).double()
    top = torch.linalg.svd(centred, full_matrices=False).S[:4]
    torch.testing.assert_close(out.double().norm(dim=0).sort(descending=True).values, top, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="dim=40"):
        PCACompression(40).fit(v)
    rm = RandomMaclaurin(20_000, in_dim=12, seed=0)
    u = rm.transform(v)
    # E[<phi(a), phi(b)>] = <a, b>^2, standard deviation about sqrt(2 / dim) |a|^2 |b|^2
    exact = (v[:5] @ v[5:10].t()) ** 2
    approx = u[:5] @ u[5:10].t()
    scale = torch.outer(v[:5].norm(dim=1) ** 2, v[5:10].norm(dim=1) ** 2)
    assert float(((approx - exact) / scale).abs().max()) < 0.06  # > 5 standard deviations
    assert float(((approx - exact) / scale).abs().max()) < float((exact / scale).max())  # not a trivial bound
    with pytest.raises(ValueError, match="expected"):
        rm.transform(v[:, :5])
