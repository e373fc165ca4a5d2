"""FV-VAE learns without collapsing (issue: sparse non-negative descriptors), its loss kernel, seeds,
finite gradients through the Fisher vector, and FisherVectorHead."""

from __future__ import annotations

import warnings

import pytest
import torch

import fvvae_fast as fv
from fvvae_fast.fim import FisherInformation
from fvvae_fast.train import CollapseWarning

from .cases import SEED, generator

f64 = torch.float64


def _sparse_sets(salt: int, sets: int = 200, t: int = 20, c: int = 384, classes: int = 4) -> fv.DescriptorSets:
    """Non-negative descriptors with about 70% exact zeros, like a ReLU conv map; class-dependent means."""
    g = generator(salt)
    labels = torch.randint(0, classes, (sets,), generator=g)
    means = 0.5 * torch.randn(classes, c, generator=g)
    x = torch.relu(torch.randn(sets, t, c, generator=g) + means[labels][:, None] - 0.55)
    return fv.DescriptorSets.from_dense(x, labels)


def _trained(data: fv.DescriptorSets, lambda3: float, *, data_init: bool = True, iterations: int = 100,
             seed: int = 0) -> fv.FVVAE:
    model = fv.FVVAE(data.dim, 31, num_classes=4 if lambda3 else 0, seed=seed)
    cfg = fv.TrainConfig(iterations=iterations, batch_sets=64, lambda3=lambda3, descriptors_per_set=16,
                         data_init=data_init, seed=seed)
    fv.train(model, data, cfg, progress=False)
    return model


@pytest.mark.parametrize("lambda3", [0.0, 1000.0])
def test_sparse_descriptors_train_with_live_units_and_nonzero_vectors(lambda3):
    data = _sparse_sets(1)
    assert 0.6 < float((data.x == 0).float().mean()) < 0.8
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        model = _trained(data, lambda3)
    live = model.liveness(data.x)
    # collapsed: 0 and 0. Healthy here after 100 iterations (8 seeds): lambda3 = 0 active >= 0.85, alive >= 0.96;
    # lambda3 = 1000 active 0.10-0.24, alive 0.45-0.76 (both rise on with training).
    assert live["active"] > 0.03 and live["alive"] > 0.25
    assert live["sigma_x_min"] >= float(model.log_sigma_x_floor.exp()) > 0
    with torch.inference_mode():
        vectors = fv.fisher_encode(model, data.x, data.offsets)
    zero, constant = fv.encode.degenerate_rows(vectors)
    assert zero == 0 and constant == 0 and bool(torch.isfinite(vectors).all())


def test_without_the_data_scaled_start_the_same_run_collapses_and_warns():
    """The failure the start fixes: PyTorch's default start kills every decoder unit on this data."""
    data = _sparse_sets(1)
    with pytest.warns(CollapseWarning, match="collapsing"):
        model = _trained(data, 0.0, data_init=False)
    assert model.liveness(data.x)["alive"] < 0.05
    with torch.inference_mode():
        zero, _ = fv.encode.degenerate_rows(fv.fisher_encode(model, data.x, data.offsets))
    assert zero > 0.9 * len(data)


def test_sigma_floor_holds_on_a_channel_that_is_always_zero():
    data = _sparse_sets(2)
    data.x[:, 5] = 0.0
    model = _trained(data, 0.0)
    floor = float(model.log_sigma_x_floor)
    rms = float(model.preprocess(data.x).pow(2).mean().sqrt())
    assert floor == pytest.approx(torch.log(torch.tensor(fv.model.SIGMA_FLOOR * rms)).item(), rel=1e-4)
    assert float(model.sigma_x_log().detach().min()) >= floor and torch.isfinite(model.inv_var()).all()


def test_liveness_is_logged_in_the_history_and_checkpoint(tmp_path):
    data = _sparse_sets(3)
    model = fv.FVVAE(data.dim, 5, seed=0)
    cfg = fv.TrainConfig(iterations=20, batch_sets=32, lambda3=0.0, log_every=10, checkpoint_every=10)
    result = fv.train(model, data, cfg, checkpoint=tmp_path / "m.pt", progress=False)
    saved = torch.load(tmp_path / "m.pt", weights_only=False)["history"]
    assert saved == result.history and len(saved) == 2
    assert {"active", "alive", "sigma_x_min", "sigma_x_max"} <= set(saved[-1])


def test_one_seed_gives_one_model():
    data = _sparse_sets(4)
    a, b = (_trained(data, 1000.0, iterations=30, seed=7).state_dict() for _ in range(2))
    c = _trained(data, 1000.0, iterations=30, seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_loss_equals_the_plain_formula_of_eq8():
    model = fv.FVVAE(12, 3, num_classes=2, seed=1).double()
    x = torch.rand(9, 12, generator=generator(6), dtype=f64)
    noise = model.draw_noise(9, generator(7), dtype=f64)
    losses = model.loss(x, torch.zeros(9, dtype=torch.int64), noise=noise)
    xp = model.preprocess(x)
    z = model.encoder(xp * noise[0] / 0.5) + noise[1] * model.log_sigma_z.exp()
    plain = ((xp - model.decode(z)) ** 2 * (0.5 * model.inv_var())).sum() / 9 + model.log_sigma_x.sum()
    torch.testing.assert_close(losses.rec, plain, rtol=1e-12, atol=0)


def test_dropout_keep_rate():
    model = fv.FVVAE(64, 3, dropout=0.3)
    keep, eps = model.draw_noise(5000, generator(8))
    assert keep.shape == (5000, 64) and keep.dtype == torch.bool and eps.shape == (5000, 3)
    assert abs(float(keep.float().mean()) - 0.7) < 0.005
    assert abs(float(keep[:, 0].float().mean()) - 0.7) < 0.03  # every column, not only on average


def test_per_set_sampling_takes_distinct_rows_of_each_set():
    x = torch.arange(40, dtype=torch.float32)[:, None].expand(40, 3).contiguous()
    data = fv.DescriptorSets(x, torch.tensor([0, 3, 3, 20, 21, 40]))
    got, offsets, owners = data.gather(torch.tensor([3, 0, 1, 2, 4]), per_set=5, generator=generator(9))
    assert offsets.tolist() == [0, 1, 4, 4, 9, 14] and owners.tolist() == [0, 1, 1, 1, 3, 3, 3, 3, 3, 4, 4, 4, 4, 4]
    rows = got[:, 0].long()
    assert sorted(rows[1:4].tolist()) == [0, 1, 2] and rows[0] == 20
    for lo, hi, (a, b) in ((4, 9, (3, 20)), (9, 14, (21, 40))):
        picked = rows[lo:hi].tolist()
        assert len(set(picked)) == 5 and all(a <= r < b for r in picked)
    whole, offsets, _ = data.gather(torch.tensor([2, 4]))
    assert offsets.tolist() == [0, 17, 36] and whole[:, 0].long().tolist() == [*range(3, 20), *range(21, 40)]


def _dead_unit_model() -> fv.FVVAE:
    model = fv.FVVAE(6, 3, hidden_dim=0, seed=3).double().eval()
    with torch.no_grad():
        model.decoder.weight[0] = 0.0
        model.decoder.bias[0] = -1.0  # unit 0 never fires: its d+1 coordinates are exactly 0
    return model


@pytest.mark.parametrize("mode", [None, "diagonal", "lowrank", "kronecker"])
def test_gradients_through_normalised_fisher_vectors_are_finite(mode):
    model = _dead_unit_model()
    g = generator(10)
    x = torch.rand(30, 6, generator=g, dtype=f64)
    offsets = torch.tensor([0, 4, 4, 11, 30])  # an empty set: a zero vector
    fim = None
    if mode is not None:
        fim = FisherInformation(mode, rank=3 if mode == "lowrank" else None)
        fim.update_descriptors(model, torch.rand(60, 6, generator=g, dtype=f64), torch.arange(11) * 6)
    x.requires_grad_()
    vectors = fv.fisher_encode(model, x, offsets, fim=fim)
    if fim is None:
        assert bool((vectors[:, :4] == 0).all())  # the dead unit's coordinates
    (vectors * torch.randn(vectors.shape, generator=g, dtype=f64)).sum().backward()
    grads = [x.grad, *(p.grad for p in model.parameters() if p.grad is not None)]
    assert len(grads) > 3 and all(bool(torch.isfinite(t).all()) for t in grads)


def test_signed_sqrt_gradient_is_zero_at_zero():
    v = torch.tensor([-4.0, 0.0, 9.0], dtype=f64, requires_grad=True)
    fv.signed_sqrt(v).sum().backward()
    torch.testing.assert_close(v.grad, torch.tensor([0.25, 0.0, 1 / 6], dtype=f64))
    assert torch.autograd.gradcheck(fv.signed_sqrt, (torch.randn(7, dtype=f64, requires_grad=True),))


def test_fisher_vector_head_is_fisher_encode_and_trains():
    model = fv.FVVAE(6, 3, hidden_dim=0, seed=4).double()
    fim = FisherInformation("diagonal").update_descriptors(model.eval(), torch.rand(40, 6, generator=generator(10),
                                                                                    dtype=f64), torch.arange(9) * 5)
    head = fv.FisherVectorHead(model, fim)
    x = torch.rand(17, 6, generator=generator(11), dtype=f64)
    offsets = torch.tensor([0, 1, 9, 17])
    torch.testing.assert_close(head(x, offsets), fv.fisher_encode(model, x, offsets, fim=fim))
    assert {n for n, _ in head.named_parameters()} >= {"model.decoder.weight", "model.log_sigma_x"}
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: head(t, offsets), (xg,))
    # a tiny backbone + head + classifier: a few optimizer steps lower the loss and move the backbone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        backbone = torch.nn.Linear(4, 6).double()
        classifier = torch.nn.Linear(6 * 4, 2).double()
    # the head's own parameters get gradients but stay fixed here: a classification loss can also switch
    # its ReLU decoder off (all vectors 0), a separate matter from gradients reaching the backbone
    opt = torch.optim.Adam([*backbone.parameters(), *classifier.parameters()], lr=0.05)
    inputs = torch.rand(17, 4, generator=generator(12), dtype=f64)
    labels = torch.tensor([0, 1, 0])
    before = backbone.weight.detach().clone()
    losses = []
    for _ in range(200):  # 100 steps were short of halving the loss on 1 draw in 40 (FVVAE_TEST_SEED=5)
        loss = torch.nn.functional.cross_entropy(classifier(head(backbone(inputs), offsets)), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and not torch.equal(backbone.weight, before)
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in head.parameters()
               if p.requires_grad and p is not head.model.log_sigma_z and p.dim() > 0)


def test_fisher_vector_head_under_autocast_and_bad_arguments():
    head = fv.FisherVectorHead(fv.FVVAE(6, 3, seed=5).eval())
    x = torch.rand(8, 6, generator=generator(13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x.to(torch.bfloat16), torch.tensor([0, 3, 8]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    with pytest.raises(TypeError, match="model must be an FVVAE"):
        fv.FisherVectorHead(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"fim must be None or have whiten\(G\)"):
        fv.FisherVectorHead(fv.FVVAE(6, 3), fim=object())
