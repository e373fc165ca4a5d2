"""Generated descriptor sets for demos and tests: conv-like (non-negative, sparse) descriptors
whose class shows in which parts appear, not in their mean alone."""

from __future__ import annotations

import torch

from .sets import DescriptorSets


def make_sets(
    num_sets: int, set_size: int = 50, dim: int = 64, num_classes: int = 5, parts: int = 12, seed: int = 0
) -> DescriptorSets:
    """``num_sets`` sets of ``set_size`` descriptors (dim,) float32 with labels in [0, num_classes).

    Each class draws its descriptors from its own mixture over shared part prototypes, so
    sets of different classes share parts and differ in their proportions.
    """
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.relu(torch.randn(parts, dim, generator=g))
    class_mix = torch.softmax(0.5 * torch.randn(num_classes, parts, generator=g), dim=1)
    labels = torch.arange(num_sets) % num_classes
    labels = labels[torch.randperm(num_sets, generator=g)]
    part = torch.multinomial(class_mix[labels], set_size, replacement=True, generator=g)  # (S, T)
    scale = torch.rand(num_sets, set_size, 1, generator=g) + 0.5
    x = torch.relu(prototypes[part] * scale + 0.3 * torch.randn(num_sets, set_size, dim, generator=g))
    return DescriptorSets.from_dense(x, labels)
