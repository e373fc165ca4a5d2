"""Scale-out on torch.distributed, 2 gloo processes on this machine, against the single-process run:
training steps and resuming under another world size, sharded encoding (byte-identical), the merged
Fisher information, and a rank killed mid-run followed by a rerun."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from fvvae_fast import distributed
from fvvae_fast.encode import fisher_encode, fisher_gradients
from fvvae_fast.model import FVVAE
from fvvae_fast.pipelines import (
    Dataset,
    PrecomputedSource,
    array_items,
    encode_store,
    estimate_fim,
    extract_descriptors,
)
from fvvae_fast.sets import DescriptorSets
from fvvae_fast.store import Store
from fvvae_fast.train import TrainConfig, load_model, train

from .cases import SEED

C, LATENT, SETS = 6, 3, 13
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def _data() -> DescriptorSets:
    """13 sets of 1..9 descriptors (uneven, so ranks get different row counts), 3 classes."""
    g = torch.Generator().manual_seed(SEED % 10_000)
    lengths = torch.randint(1, 10, (SETS,), generator=g)
    x = torch.rand(int(lengths.sum()), C, generator=g)
    return DescriptorSets(x, torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
                          torch.arange(SETS) % 3)


def _model() -> FVVAE:
    torch.manual_seed(SEED % 1000)
    return FVVAE(in_dim=C, latent_dim=LATENT, num_classes=3)


def _config(iterations: int) -> TrainConfig:
    return TrainConfig(iterations=iterations, batch_sets=7, lambda3=2.0, seed=SEED % 1000, checkpoint_every=1)


def _store(tmp: Path) -> Path:
    data = _data()
    x, off = data.x.numpy(), data.offsets.numpy()
    splits = ["train" if i % 4 else "test" for i in range(SETS)]
    items = array_items(x, off, labels=data.labels.tolist(), splits=splits)
    extract_descriptors(PrecomputedSource(arrays=(x, off)), Dataset("gen", items, ["a", "b", "c"]), tmp / "desc",
                        shard_items=2, progress=False)
    return tmp / "desc"


def _worker(rank: int, world: int, port: int, task: str, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert distributed.init_from_env(backend="gloo", timeout_s=60)
    tmp = Path(tmp)
    try:
        if task == "train":
            train(_model(), _data(), _config(4), checkpoint=tmp / "ddp.pt", progress=False)
        elif task == "train-half":
            train(_model(), _data(), _config(2), checkpoint=tmp / "resume.pt", progress=False)
        elif task == "encode":
            encode_store(load_model(tmp / "model.pt"), Store.open(tmp / "desc"), tmp / "fisher-ddp", batch_sets=3,
                         progress=False)
        elif task.startswith("fim-"):
            fim = estimate_fim(load_model(tmp / "model.pt"), Store.open(tmp / "desc"), mode=task[4:],
                               rank=2 if task == "fim-lowrank" else None, split=None, batch_sets=2, progress=False)
            torch.save(fim.state_dict(), tmp / f"{task}-rank{rank}.pt")
        elif task.startswith("extract-killed"):  # extract-killed-R-N: rank R is killed after writing N shards
            data = _data()
            x, off = data.x.numpy(), data.offsets.numpy()
            items = array_items(x, off, labels=data.labels.tolist())
            killed, after = (int(v) for v in task.split("-")[2:])
            written = []

            def die(shard: int) -> None:
                written.append(shard)
                if rank == killed and len(written) == after:
                    os._exit(3)

            extract_descriptors(PrecomputedSource(arrays=(x, off)), Dataset("gen", items, ["a", "b", "c"]),
                                tmp / "killed", shard_items=2, progress=False, on_shard=die)
        elif task == "shutdown":
            data = _data()
            fisher_encode(_model().eval(), data.x, data.offsets)  # the custom op's first call
            distributed.total(1)
            distributed.shutdown()
            (tmp / f"threads-rank{rank}.txt").write_text("\n".join(_gloo_threads()))
    finally:
        distributed.shutdown()


def _gloo_threads() -> list[str]:
    """Names of this process's threads that belong to gloo (Linux)."""
    names = ((t / "comm").read_text().strip() for t in Path("/proc/self/task").iterdir())
    return [n for n in names if "gloo" in n]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(task: str, tmp: Path, world: int = 2) -> None:
    os.environ["FVVAE_TEST_SEED"] = str(SEED)  # the workers draw the same data and models as this process
    mp.spawn(_worker, args=(world, _free_port(), task, str(tmp)), nprocs=world, join=True)


def test_training_matches_single_process_and_resumes_under_another_world_size(tmp_path):
    _spawn("train", tmp_path)
    single = train(_model(), _data(), _config(4), progress=False).model
    ddp = load_model(tmp_path / "ddp.pt")
    for (name, a), b in zip(single.state_dict().items(), ddp.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # two ranks train the first half; one process resumes their checkpoint to the end
    _spawn("train-half", tmp_path)
    resumed = train(_model(), _data(), _config(4), checkpoint=tmp_path / "resume.pt", progress=False,
                    resume="extend")
    assert resumed.resumed_from == 2
    for a, b in zip(single.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    single_opt = torch.load(tmp_path / "ddp.pt", weights_only=False)["optimizer_state"]["state"]
    resumed_opt = torch.load(tmp_path / "resume.pt", weights_only=False)["optimizer_state"]["state"]
    for k in single_opt:
        torch.testing.assert_close(resumed_opt[k]["square_avg"], single_opt[k]["square_avg"], atol=1e-6, rtol=1e-4)


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_shutdown_joins_the_group_threads_after_our_ops(tmp_path):
    """After shutdown no gloo thread is left to die in interpreter shutdown (SIGABRT at exit);
    torch 2.14 kept the group alive when torch._dynamo was first imported after it existed."""
    _spawn("shutdown", tmp_path)
    for rank in range(2):
        assert (tmp_path / f"threads-rank{rank}.txt").read_text() == ""


def test_sharded_encoding_is_byte_identical(tmp_path):
    desc = _store(tmp_path)
    model = _model().eval()
    torch.save({"version": 1, "model_config": model.config(), "model_state": model.state_dict()}, tmp_path / "model.pt")
    encode_store(load_model(tmp_path / "model.pt"), Store.open(desc), tmp_path / "fisher-one", batch_sets=3,
                 progress=False)
    _spawn("encode", tmp_path)
    one, two = Store.open(tmp_path / "fisher-one"), Store.open(tmp_path / "fisher-ddp")
    assert one.items() == two.items() and two.summary().pending == 0
    files = sorted(p.name for p in (tmp_path / "fisher-one" / "shards").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "fisher-ddp" / "shards").iterdir())  # no journal left
    for name in files:
        assert (tmp_path / "fisher-one/shards" / name).read_bytes() == (tmp_path / "fisher-ddp/shards" / name).read_bytes()


@pytest.mark.parametrize("mode", ["diagonal", "lowrank", "kronecker"])
def test_merged_fisher_information_equals_single_process(tmp_path, mode):
    desc = _store(tmp_path)
    model = _model().eval()
    torch.save({"version": 1, "model_config": model.config(), "model_state": model.state_dict()}, tmp_path / "model.pt")
    _spawn(f"fim-{mode}", tmp_path)
    one = estimate_fim(load_model(tmp_path / "model.pt"), Store.open(desc), mode=mode,
                       rank=2 if mode == "lowrank" else None, split=None, batch_sets=2, progress=False)
    states = [torch.load(tmp_path / f"fim-{mode}-rank{r}.pt", weights_only=False) for r in (0, 1)]
    from fvvae_fast.fim import FisherInformation

    merged = [FisherInformation(mode, rank=2 if mode == "lowrank" else None).load_state_dict(s) for s in states]
    assert merged[0].num_sets == merged[1].num_sets == one.num_sets == SETS
    if mode == "kronecker":
        for a, b in zip(merged[0].kronecker_factors()[:2], one.kronecker_factors()[:2]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        return
    torch.testing.assert_close(merged[0].diagonal(), one.diagonal(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(merged[1].diagonal(), merged[0].diagonal(), rtol=0, atol=0)  # the same on all ranks
    if mode == "lowrank":
        # the merged sketch obeys the Frequent Directions bound over all the data: 0 <= F - B^T B / n <= err I
        sets = Store.open(desc).sets()
        with torch.no_grad():
            g = fisher_gradients(load_model(tmp_path / "model.pt"), torch.as_tensor(np.asarray(sets.x)),
                                 sets.offsets).flatten(1).double()
        f = g.t() @ g / SETS
        b = merged[0]._stats.fd.sketch.double()
        gap = torch.linalg.eigvalsh(f - b.t() @ b / SETS)
        slack = 1e-5 * float(torch.linalg.matrix_norm(f, ord=2))  # the sketch rows are float32
        assert float(gap.min()) >= -slack and float(gap.max()) <= merged[0].sketch_error + slack


@pytest.mark.parametrize("killed, after", [(1, 1), (0, 2)])
def test_killed_rank_then_rerun_completes_without_duplicates(tmp_path, killed, after):
    with pytest.raises(Exception):
        _spawn(f"extract-killed-{killed}-{after}", tmp_path)
    journals = list((tmp_path / "killed" / "shards").glob("*.journal.json"))
    assert journals, "the killed rank's finished shard left a journal"
    data = _data()
    x, off = data.x.numpy(), data.offsets.numpy()
    items = array_items(x, off, labels=data.labels.tolist())
    ds = Dataset("gen", items, ["a", "b", "c"])
    report = extract_descriptors(PrecomputedSource(arrays=(x, off)), ds, tmp_path / "killed", shard_items=2,
                                 progress=False)
    assert report.resumed >= 2  # the shards finished before the kill are kept
    extract_descriptors(PrecomputedSource(arrays=(x, off)), ds, tmp_path / "clean", shard_items=2, progress=False)
    rerun, clean = Store.open(tmp_path / "killed"), Store.open(tmp_path / "clean")
    assert rerun.items() == clean.items() and rerun.summary().done == SETS
    assert not list((tmp_path / "killed" / "shards").glob("*.journal.json"))
    for f in sorted((tmp_path / "clean" / "shards").iterdir()):
        assert (tmp_path / "killed" / "shards" / f.name).read_bytes() == f.read_bytes()
    assert (tmp_path / "killed/manifest.sqlite").read_bytes() == (tmp_path / "clean/manifest.sqlite").read_bytes()


def _one_and_two_processes(tmp_path: Path, args: list[str]) -> str:
    """Run ``fvvae *args`` alone into tmp/one and under torchrun (2 processes) into tmp/two; check the two
    stores (shards and manifest) are the same byte for byte; the torchrun run's stdout."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "fvvae_fast", *args, "--out", str(tmp_path / "one")], check=True, env=env,
                   capture_output=True, timeout=300)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-port", str(_free_port()), "-m", "fvvae_fast", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    for f in sorted((tmp_path / "one" / "shards").iterdir()):
        assert (tmp_path / "two" / "shards" / f.name).read_bytes() == f.read_bytes()
    assert (tmp_path / "two/manifest.sqlite").read_bytes() == (tmp_path / "one/manifest.sqlite").read_bytes()
    return two.stdout


def _saved_model(tmp_path: Path) -> FVVAE:
    model = _model().eval()
    torch.save({"version": 1, "model_config": model.config(), "model_state": model.state_dict()}, tmp_path / "m.pt")
    return model


def test_cli_stages_run_unchanged_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m fvvae_fast encode ...` writes the single-process store, byte for byte."""
    desc = _store(tmp_path)
    _saved_model(tmp_path)
    out = _one_and_two_processes(tmp_path, ["encode", "--model", str(tmp_path / "m.pt"), "--descriptors", str(desc),
                                            "--quiet", "--batch-sets", "3"])
    assert out.count("encode: 13 sets computed") == 1  # rank 0 reports for both


def test_one_pass_to_fisher_vectors_under_torchrun(tmp_path):
    """`descriptors --model` (frames or arrays straight to Fisher vectors) under torchrun: the
    single-process store byte for byte, and the vectors of `fisher_encode`."""
    data = _data()
    np.save(tmp_path / "x.npy", data.x.numpy())
    np.save(tmp_path / "offsets.npy", data.offsets.numpy())
    model = _saved_model(tmp_path)
    _one_and_two_processes(tmp_path, ["descriptors", "--dataset", "arrays", "--arrays", str(tmp_path / "x.npy"),
                                      "--offsets", str(tmp_path / "offsets.npy"), "--model", str(tmp_path / "m.pt"),
                                      "--shard-items", "2", "--quiet"])
    X, _, _ = Store.open(tmp_path / "two", kind="fisher").vectors()
    want = fisher_encode(model, data.x, data.offsets, normalize=True)
    np.testing.assert_allclose(X, want.detach().numpy(), rtol=1e-5, atol=1e-6)
