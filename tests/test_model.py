"""FVVAE: architecture (Table 7), preprocessing, the loss terms of Eq. 8."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fvvae_fast as fv

from .cases import generator


def test_architecture_follows_the_paper():
    model = fv.FVVAE(in_dim=32, latent_dim=7, num_classes=4)
    linears = [m for m in model.encoder if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(32, 32), (32, 7)]  # C -> C -> d
    assert isinstance(model.decoder, nn.Linear) and model.decoder.weight.shape == (32, 7)
    assert model.classifier.weight.shape == (4, 7)
    assert model.log_sigma_z.shape == (7,) and model.log_sigma_x.shape == (32,)
    released = fv.FVVAE(in_dim=32, latent_dim=8, hidden_dim=0, norm="map")
    assert [type(m) for m in released.encoder] == [nn.Linear]
    deep = fv.FVVAE(in_dim=32, latent_dim=8, hidden_dim=[16, 12])
    assert [m.out_features for m in deep.encoder if isinstance(m, nn.Linear)] == [16, 12, 8]


def test_preprocess_norms():
    x = torch.rand(6, 16, generator=generator(1)) * 5
    x[2] = 0
    model = fv.FVVAE(16, 4)
    xp = model.preprocess(x)
    torch.testing.assert_close(xp[[0, 1, 3, 4, 5]].norm(dim=1), torch.ones(5))
    assert bool((xp[2] == 0).all())
    torch.testing.assert_close(model.preprocess(xp), xp)  # idempotent: encode() may be given either
    assert fv.FVVAE(16, 4, norm="map").preprocess(x) is x
    maps = torch.rand(3, 16, 7, 7, generator=generator(2))
    torch.testing.assert_close(fv.normalize_map(maps, 158.0).flatten(1).norm(dim=1), torch.full((3,), 158.0))


def test_encode_and_inv_var():
    model = fv.FVVAE(16, 4).eval()
    x = torch.rand(5, 16, generator=generator(3))
    torch.testing.assert_close(model.encode(x), model.encoder(x / x.norm(dim=1, keepdim=True)))
    with torch.no_grad():
        model.log_sigma_x.fill_(0.5)
    torch.testing.assert_close(model.inv_var(), torch.full((16,), torch.e**-1.0))


def test_losses_match_direct_computation():
    model = fv.FVVAE(12, 5, num_classes=3).eval()
    with torch.no_grad():
        model.log_sigma_z.normal_(generator=generator(4))
        model.log_sigma_x.normal_(generator=generator(5))
    x = torch.rand(9, 12, generator=generator(6), dtype=torch.float32)
    labels = torch.randint(0, 3, (9,), generator=generator(7))
    losses = model.loss(x, labels, lambdas=(1.0, 2.0, 3.0))
    xp = x / x.norm(dim=1, keepdim=True)
    mu_z = model.encoder(xp)
    mu_x = torch.relu(model.decoder(mu_z))
    sx2 = torch.exp(2 * model.log_sigma_x)
    rec = (((xp - mu_x) ** 2 / (2 * sx2)) + model.log_sigma_x).sum(1).mean()
    sz2 = torch.exp(2 * model.log_sigma_z)
    reg = (0.5 * (mu_z**2).sum(1) + 0.5 * sz2.sum() - 0.5 * (1 + torch.log(sz2)).sum()).mean()
    cls = nn.functional.cross_entropy(model.classifier(mu_z), labels)
    torch.testing.assert_close(losses.rec, rec)
    torch.testing.assert_close(losses.reg, reg)
    torch.testing.assert_close(losses.cls, cls)
    torch.testing.assert_close(losses.total, rec + 2 * reg + 3 * cls)


def test_training_mode_drops_encoder_input_but_reconstructs_clean_input():
    model = fv.FVVAE(64, 4, dropout=0.5).train()
    seen = []
    encoder = model._encoder_fused  # the loss's encoder (hidden layers fused on the CPU)
    model._encoder_fused = lambda x_in: (seen.append(x_in), encoder(x_in))[1]
    x = torch.rand(50, 64, generator=generator(8)) + 0.1
    a = model.loss(x, generator=torch.Generator().manual_seed(0))
    b = model.loss(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.total, b.total)  # seeded: reproducible
    xp = model.preprocess(x)
    dropped = seen[0] == 0
    assert 0.4 < dropped.float().mean() < 0.6
    torch.testing.assert_close(seen[0][~dropped], 2 * xp[~dropped])  # inverted dropout
    model.eval()
    seen.clear()
    model.loss(x)
    torch.testing.assert_close(seen[0], xp)  # no dropout at extraction


def test_bad_arguments():
    with pytest.raises(ValueError, match="norm must be one of"):
        fv.FVVAE(8, 2, norm="l1")
    with pytest.raises(ValueError, match="dropout must be in"):
        fv.FVVAE(8, 2, dropout=1.0)
    model = fv.FVVAE(8, 2, num_classes=3)
    with pytest.raises(ValueError, match=r"x must be \(N, C=8\)"):
        model.encode(torch.rand(4, 9))
    with pytest.raises(TypeError, match="floating"):
        model.encode(torch.ones(4, 8, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"x is torch.float64 but the model's parameters are torch.float32"):
        model.encode(torch.rand(4, 8, dtype=torch.float64))  # was torch's "mat1 and mat2 must have the same dtype"
    with pytest.raises(ValueError, match="x is on meta but the model is on cpu"):
        model.encode(torch.rand(4, 8, device="meta"))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes are autocast's to handle
        assert model.encode(torch.rand(4, 8, dtype=torch.bfloat16)).shape == (4, 2)
    with pytest.raises(ValueError, match="labels"):
        model.loss(torch.rand(4, 8))


NAN = float("nan")
BAD_CONSTRUCTIONS = [  # (keyword arguments, error, the message names the argument, the value and what is expected)
    ({"hidden_dim": -5}, ValueError, r"hidden_dim must be >= 0, got -5"),
    ({"hidden_dim": [8, 0]}, ValueError, r"hidden_dim must be None, an int >= 0 or a sequence of ints >= 1 .*\[8, 0\]"),
    ({"hidden_dim": [-3]}, ValueError, r"hidden_dim must be None, an int >= 0 or a sequence of ints >= 1 .*\[-3\]"),
    ({"hidden_dim": "512"}, ValueError, r"hidden_dim must be .*got '512'"),
    ({"norm_scale": NAN}, ValueError, r"norm_scale must be a finite number > 0, got nan"),
    ({"norm_scale": 0.0}, ValueError, r"norm_scale must be a finite number > 0, got 0.0"),
    ({"eps": -1}, ValueError, r"eps must be a finite number > 0, got -1"),
    ({"in_dim": True}, TypeError, r"in_dim must be an int, got bool True"),
    ({"in_dim": "8"}, TypeError, r"in_dim must be an int, got str '8'"),
    ({"in_dim": 8.0}, TypeError, r"in_dim must be an int, got float 8.0"),
    ({"latent_dim": 0}, ValueError, r"latent_dim must be >= 1, got 0"),
    ({"num_classes": -1}, ValueError, r"num_classes must be >= 0, got -1"),
    ({"dropout": NAN}, ValueError, r"dropout must be in \[0, 1\), got nan"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_CONSTRUCTIONS, ids=[str(k) for k, _, _ in BAD_CONSTRUCTIONS])
def test_each_bad_constructor_argument_is_one_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        fv.FVVAE(**{"in_dim": 8, "latent_dim": 2, **kwargs})


def test_good_hidden_layers_still_build():
    assert fv.FVVAE(8, 2, hidden_dim=0).hidden_dims == () and fv.FVVAE(8, 2, hidden_dim=()).hidden_dims == ()
    assert fv.FVVAE(8, 2, hidden_dim=[6, 5]).hidden_dims == (6, 5) and fv.FVVAE(8, 2).hidden_dims == (8,)


BAD_LABELS = [  # labels of 3 descriptors for a model of 4 classes
    (torch.tensor([0, -100, 1]), ValueError, r"labels must be in \[0, num_classes=4\), got -100 at 1"),  # no ignore index
    (torch.tensor([0, 7, 1]), ValueError, r"labels must be in \[0, num_classes=4\), got 7 at 1"),
    (torch.tensor([-1, 0, 1]), ValueError, r"labels must be in \[0, num_classes=4\), got -1 at 0"),
    (torch.tensor([0.0, 1.0, 2.0]), TypeError, r"labels must be an integer tensor \(class indices\), got torch.float32"),
    (torch.tensor([True, False, True]), TypeError, r"labels must be an integer tensor .*torch.bool"),
    ([0, 1, 2], TypeError, r"labels must be an integer tensor .*got list"),
]


@pytest.mark.parametrize("labels,error,match", BAD_LABELS, ids=["ignore-index", "7-of-4", "-1", "float", "bool", "list"])
@pytest.mark.parametrize("training", [False, True], ids=["loss", "training-step"])
def test_loss_labels_must_be_class_indices(labels, error, match, training):
    """FVVAE.loss and the fused training step (ops.training.loss_backward) refuse the same labels."""
    from fvvae_fast.ops.training import loss_backward

    model = fv.FVVAE(8, 2, num_classes=4, seed=0).train(training)
    x = torch.rand(3, 8, generator=generator(4))
    with pytest.raises(error, match=match):
        if training:
            loss_backward(model, x, labels, model.draw_noise(3), (1.0, 1.0, 1.0))
        else:
            model.loss(x, labels)


@pytest.mark.parametrize("rows,match", [
    (torch.full((4, 8), NAN), r"finite values and at least one non-zero row, got 4 rows, 4 with NaN or Inf, 0 all zero"),
    (torch.zeros(4, 8), r"finite values and at least one non-zero row, got 4 rows, 0 with NaN or Inf, 4 all zero"),
    (torch.zeros(0, 8), r"finite values and at least one non-zero row, got 0 rows"),
], ids=["nan", "all-zero", "empty"])
def test_init_from_data_refuses_data_without_scale(rows, match):
    model = fv.FVVAE(8, 2, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"FVVAE.init_from_data: x must hold {match}"):
        model.init_from_data(rows)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed
