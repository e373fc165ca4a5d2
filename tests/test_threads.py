"""The CPU quota (affinity, cgroup v2 and v1 limits) and torch's thread count under it."""

from __future__ import annotations

import os

import pytest
import torch

from fvvae_fast import threads

CGROUPS = {  # id: (files under the cgroup root, CPUs with 8 in the affinity mask)
    "none": ({}, 8),
    "v2-max": ({"cpu.max": "max 100000\n"}, 8),
    "v2-1.5-cpus": ({"cpu.max": "150000 100000\n"}, 2),
    "v2-2-cpus": ({"cpu.max": "200000 100000\n"}, 2),
    "v2-a-tenth": ({"cpu.max": "10000 100000\n"}, 1),
    "v1-3-cpus": ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    "v1-unlimited": ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, 8),
    "v2-garbled": ({"cpu.max": "lots\n"}, 8),
}


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """An 8-CPU affinity mask, no OMP_NUM_THREADS, and an empty cgroup root at tmp_path to fill."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(threads, "CGROUP_ROOT", tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return tmp_path


@pytest.mark.parametrize("files, cpus", CGROUPS.values(), ids=CGROUPS.keys())
def test_cpu_quota_follows_the_cgroup_limit(machine, files, cpus):
    for name, text in files.items():
        (machine / name).parent.mkdir(parents=True, exist_ok=True)
        (machine / name).write_text(text)
    assert threads.cpu_quota() == cpus


def test_cpu_quota_follows_the_affinity_mask(machine, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 5}, raising=False)
    assert threads.cpu_quota() == 2
    (machine / "cpu.max").write_text("400000 100000\n")  # a quota above the mask: the mask
    assert threads.cpu_quota() == 2


def test_advised_threads_take_omp_num_threads_as_a_bound(machine, monkeypatch):
    assert threads.advised_threads() == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.advised_threads() == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "64")  # more than the quota: the quota
    assert threads.advised_threads() == 8


def test_limit_torch_threads_lowers_and_restores(machine):
    (machine / "cpu.max").write_text("100000 100000\n")  # one CPU
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with threads.limit_torch_threads() as now:
            assert now == torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with threads.limit_torch_threads(8) as now:  # never raised
            assert now == torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
