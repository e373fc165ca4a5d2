"""DescriptorSets: offsets and labels are integers, never truncated."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fvvae_fast.sets import DescriptorSets

X = torch.rand(5, 3)
BAD = [
    ({"offsets": [0, 2.5, 5]}, ValueError, r"DescriptorSets: offsets must be integers, got 2.5 at 1"),
    ({"offsets": torch.tensor([0.0, 2.0, 5.5])}, ValueError, r"offsets must be integers, got 5.5 at 2"),
    ({"offsets": [0, float("nan"), 5]}, ValueError, r"offsets must be integers, got nan at 1"),
    ({"offsets": ["0", "2", "5"]}, TypeError, r"offsets must be integers, got <U1 values"),
    ({"labels": [0.7, 1.0]}, ValueError, r"DescriptorSets: labels must be integers, got 0.7 at 0"),
    ({"labels": np.array([1.0, 1.9])}, ValueError, r"labels must be integers, got 1.9 at 1"),
    ({"labels": [True, False]}, TypeError, r"labels must be integers, got bool values"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD, ids=[f"{k}={v!r}" for k, v in (next(iter(c[0].items())) for c in BAD)])
def test_fractional_offsets_and_labels_are_refused_not_truncated(kwargs, error, match):
    with pytest.raises(error, match=match):
        DescriptorSets(X, **{"offsets": [0, 2, 5], **kwargs})


def test_whole_valued_floats_are_taken_as_integers():
    sets = DescriptorSets(X, np.array([0.0, 2.0, 5.0]), torch.tensor([1.0, 0.0]))
    assert sets.offsets.tolist() == [0, 2, 5] and sets.offsets.dtype == torch.int64
    assert sets.labels.tolist() == [1, 0] and sets.labels.dtype == torch.int64
