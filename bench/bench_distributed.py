"""Scale-out on this machine: encoding throughput with 1 and 2 gloo processes, and the time and
volume of the FIM merge across 2 ranks as a function of D and k.

    python -m pytest bench/bench_distributed.py --benchmark-only -s

Each timed round spawns the processes (``torch.multiprocessing``, gloo on 127.0.0.1), which each
encode their share of the sets (FV-VAE C = 512, d = 255, sets of 50) or merge their estimator; the
round's time is the slowest rank's, measured inside the workers between barriers (process start-up,
imports and a warm-up call are not counted; encoding: the mean of 5 calls). The merge's volume per rank is what it sends: the all-reduced sums
(8 D bytes, float64) and the all-gathered sketch buffer (2 l x D floats, l = 2k).
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from common import record

from fvvae_fast import distributed
from fvvae_fast.encode import fisher_encode
from fvvae_fast.fim import FisherInformation
from fvvae_fast.model import FVVAE

C, LATENT, T, SETS = 512, 255, 50, 64
REPEATS = 5  # timed encodings per spawn (after one warm-up)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, task: str, arg: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    distributed.init_from_env(backend="gloo")
    torch.manual_seed(0)
    if task == "encode":
        model = FVVAE(in_dim=C, latent_dim=LATENT).eval()
        mine = range(rank, SETS, world)
        x = torch.relu(torch.randn(len(mine) * T, C))
        offsets = torch.arange(len(mine) + 1) * T
        with torch.inference_mode():
            fisher_encode(model, x, offsets)  # warm-up
            distributed.barrier()
            t0 = time.perf_counter()
            for _ in range(REPEATS):
                fisher_encode(model, x, offsets)
            distributed.barrier()
    else:
        dim, k = arg, int(task.split("-")[1])
        fim = FisherInformation("lowrank", rank=k) if k else FisherInformation("diagonal")
        fim.update(torch.randn(max(8, 4 * k + 1), dim))
        distributed.barrier()
        t0 = time.perf_counter()
        fim.all_reduce()
        distributed.barrier()
    seconds = (time.perf_counter() - t0) / (REPEATS if task == "encode" else 1)
    if rank == 0:
        Path(out).write_text(str(seconds))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _run(world: int, task: str, arg: int = 0) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "seconds")
        mp.spawn(_worker, args=(world, _port(), task, arg, out), nprocs=world, join=True)
        return float(Path(out).read_text())


@pytest.mark.parametrize("world", [1, 2])
def test_encode_scaling(benchmark, world):
    seconds: list[float] = []
    benchmark.pedantic(lambda: seconds.append(_run(world, "encode")), rounds=3, warmup_rounds=1, iterations=1)
    n = SETS * T
    record(benchmark, op="encode", method=f"{world}-process", shape=f"C{C}-d{LATENT}-{SETS}x{T}",
           dtype=torch.float32, flops=2 * n * (C * C + C * LATENT) + 4 * n * C * (LATENT + 1), nbytes=4 * n * C,
           seconds=seconds)
    benchmark.extra_info["sets_per_s"] = SETS / benchmark.extra_info["median_s"]


@pytest.mark.parametrize("k", [0, 32, 128])
@pytest.mark.parametrize("dim", [C * (LATENT + 1), 4 * C * (LATENT + 1)], ids=lambda d: f"D{d}")
def test_fim_merge(benchmark, dim, k):
    seconds: list[float] = []
    benchmark.pedantic(lambda: seconds.append(_run(2, f"merge-{k}", dim)), rounds=3, warmup_rounds=0, iterations=1)
    sent = 8 * dim + (2 * (2 * k) * dim * 4 if k else 0)  # float64 sums + float32 (2l, D) sketch buffer
    record(benchmark, op="fim-merge", method=f"k{k} {sent / 2**20:.1f} MiB/rank", shape=f"D{dim}",
           dtype=torch.float32, flops=0, nbytes=sent, seconds=seconds)
