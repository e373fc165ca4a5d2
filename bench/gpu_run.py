"""One device run for the whole product, at most 9 minutes on an H100 or H200.

    python bench/gpu_run.py [--out DIR] [--budget SECONDS]
    python bench/gpu_run.py --dry-run [--out DIR]     # tiny shapes, CPU under TRITON_INTERPRET=1

Measures, in order: the machine's ceilings (bf16 and fp32 GEMM by torch.mm, copy bandwidth); every design
of the forward (fused Triton, split GEMMs, plain torch, naive autograd) at the paper's shapes (frames:
4,096 sets x 50 rows, videos: 64 x 1,250; C = 512, d = 255) in bf16 and fp32, each with its error against
float64, its wall time with a sync per call, its CUDA-graph replay time, its kernel time per call from
torch.profiler (so host time shows apart) and its fraction of the roofline from the measured ceilings; the
bf16 forward's time per step over one wave of CTAs (one busy program per SM); the chooser's pick; the
backward; then each CUDA path of the product once, small (fisher_vectors, the backward, train,
FisherVectorHead, finetune, ``fvvae descriptors --decoder torchcodec-cuda``, a one-rank NCCL group); and
``ncu --clock-control none`` on the chosen forward when ncu is installed.

Each result is one JSON line of ``gpu_run.jsonl`` and one row of ``gpu_run.md`` in the output folder (--out,
else $OUT, else ./gpu_run_out), written and flushed as it comes, so a cut run still leaves data. Every
section is guarded (a failure is a row, the run goes on) and the run stops starting work at --budget.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]  # a plain checkout: fvvae_fast and bench/common.py

import torch  # noqa: E402

CUDA_ONLY = "CUDA only (dry run)"


class Run:
    """The output streams, the device, the clock."""

    def __init__(self, out: Path, budget_s: float, dry: bool):
        out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(out / "gpu_run.jsonl", "a", buffering=1)  # noqa: SIM115  (kept open for the run)
        self.md = open(out / "gpu_run.md", "a", buffering=1)  # noqa: SIM115
        self.md.write("| section | what | shape | dtype | result |\n|---|---|---|---|---|\n")
        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.ceilings: dict[str, float] = {}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def row(self, section: str, what: str, shape: str = "", dtype: str = "", **result) -> None:
        record = {"section": section, "what": what, "shape": shape, "dtype": dtype, **result,
                  "t_s": round(time.monotonic() - self.start, 1)}
        self.jsonl.write(json.dumps(record, default=str) + "\n")
        brief = ", ".join(f"{k}={_fmt(v)}" for k, v in result.items() if k != "traceback")
        self.md.write(f"| {section} | {what} | {shape} | {dtype} | {brief.replace('|', '/')} |\n")
        print(json.dumps({k: v for k, v in record.items() if k != "traceback"}, default=str)[:300], flush=True)

    @contextlib.contextmanager
    def guarded(self, section: str, what: str, shape: str = "", dtype: str = "", *, cuda_only: bool = False):
        """Runs the body unless the budget is spent (or it needs CUDA in a dry run); records a failure."""
        if cuda_only and self.dry:
            self.row(section, what, shape, dtype, skipped=CUDA_ONLY)
            yield None
            return
        if self.left() <= 0:
            self.row(section, what, shape, dtype, skipped="time budget spent")
            yield None
            return
        try:
            yield True
        except Exception as err:  # noqa: BLE001  recorded; the run goes on
            self.row(section, what, shape, dtype, error=f"{type(err).__name__}: {str(err)[:500]}",
                     traceback=traceback.format_exc()[-3000:])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)[:120]


def sync(run: Run) -> None:
    if run.device.type == "cuda":
        torch.cuda.synchronize()


def wall_ms(run: Run, fn, reps: int) -> float:
    """Median wall milliseconds of ``fn`` with a device sync after each call (host time included)."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(run)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def event_ms(fn, reps: int) -> float:
    """Median device milliseconds between CUDA events around ``fn`` (the chooser's own clock)."""
    from fvvae_fast.ops.chooser import cuda_seconds

    return 1e3 * cuda_seconds(fn, reps)


def graph_ms(fn, reps: int) -> float:
    """Median milliseconds of one CUDA-graph replay of ``fn`` (captured after the caller's warm-up)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up on a side stream, as torch.cuda.graphs asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return event_ms(graph.replay, reps)


def kernel_ms(fn, calls: int) -> tuple[float, float]:
    """(device kernel milliseconds per call, kernels per call) from torch.profiler over ``calls`` calls: the
    device's busy time without the host's launch gaps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    total_us = sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) for e in kernels)
    return total_us / 1e3 / calls, len(kernels) / calls


def named_kernel_ms(fn, name: str, calls: int) -> float:
    """Device milliseconds per call of the kernels whose name holds ``name`` (torch.profiler), the launcher's
    other kernels left out."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA" and name in e.name]
    return sum(getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0) for e in kernels) / 1e3 / calls


def attempt(result: dict, key: str, fn) -> None:
    """result[key] = fn(), or the error it raised under key + "_error" (the row keeps its other numbers)."""
    try:
        result[key] = fn()
    except Exception as err:  # noqa: BLE001
        result[f"{key}_error"] = f"{type(err).__name__}: {str(err)[:300]}"


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (inf where out is not finite)."""
    out, ref = out.detach().double().to(ref.device), ref.detach()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    scale = float(ref.abs().max()) if ref.numel() else 1.0
    return float((out - ref).abs().max()) / max(scale, 1e-30) if ref.numel() else 0.0


# ----------------------------------------------------------------------------------------------- sections
def section_env(run: Run) -> None:
    from common import machine_line

    with run.guarded("env", "machine") as ok:
        if ok:
            info = {"machine": machine_line(), "dry_run": run.dry, "budget_s": run.budget_s}
            if run.device.type == "cuda":
                p = torch.cuda.get_device_properties(run.device)
                info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                            memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
            info["grouped_mm"] = hasattr(torch, "_grouped_mm")
            run.row("env", "machine", **info)


def section_ceilings(run: Run) -> None:
    n = 64 if run.dry else 8192
    reps = 2 if run.dry else 10
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        with run.guarded("ceilings", "gemm torch.mm", f"{n}^3", name) as ok:
            if ok:
                a = torch.randn(n, n, device=run.device).to(dtype)
                b = torch.randn(n, n, device=run.device).to(dtype)
                torch.mm(a, b)
                sync(run)
                ms = wall_ms(run, lambda: torch.mm(a, b), reps) if run.dry else event_ms(lambda: torch.mm(a, b), reps)
                run.ceilings[f"gemm_{name}"] = 2 * n**3 / (ms * 1e-3)
                run.row("ceilings", "gemm torch.mm", f"{n}^3", name, ms=ms, tflops=run.ceilings[f"gemm_{name}"] / 1e12,
                        tf32=torch.backends.cuda.matmul.allow_tf32)
    with run.guarded("ceilings", "copy") as ok:
        if ok:
            nbytes = (1 << 20) if run.dry else (1 << 30)
            src = torch.empty(nbytes, dtype=torch.uint8, device=run.device)
            dst = torch.empty_like(src)
            dst.copy_(src)
            sync(run)
            ms = wall_ms(run, lambda: dst.copy_(src), reps) if run.dry else event_ms(lambda: dst.copy_(src), reps)
            run.ceilings["copy_bytes_s"] = 2 * nbytes / (ms * 1e-3)
            run.row("ceilings", "copy", f"{nbytes} B", ms=ms, tb_s_read_plus_write=run.ceilings["copy_bytes_s"] / 1e12)


def _shapes(run: Run):
    from common import Shape

    if run.dry:
        return [Shape("frames-tiny", 24, 13, 4, 5), Shape("videos-tiny", 24, 13, 2, 21)]
    return [Shape("frames", 512, 255, 4096, 50), Shape("videos", 512, 255, 64, 1250)]


def _designs():
    """name -> (forward of the op's arguments, CUDA-graph capturable)."""
    from fvvae_fast.ops import dispatch, naive

    fused, split = dispatch.import_kernels("fisher_accumulate"), dispatch.import_kernels("fisher_split")
    return {
        "fused": (fused.fisher_accumulate_fwd, True),
        "split": (split.fisher_accumulate_split, True),
        "split-triton": (lambda *a: split.fisher_accumulate_split(*a, grouped=False), True),
        "plain-torch": (naive.padded_bmm_accumulate, False),
        "naive-autograd": (naive.autograd_accumulate, False),
    }


def _roofline_ms(run: Run, shape, dtype: torch.dtype) -> float | None:
    """The floor from the measured ceilings: max(FLOPs / GEMM rate of the dtype, bytes / copy bandwidth)."""
    gemm = run.ceilings.get("gemm_bf16" if dtype != torch.float32 else "gemm_fp32")
    copy = run.ceilings.get("copy_bytes_s")
    if not gemm or not copy:
        return None
    return max(shape.flops() / gemm, shape.bytes(dtype) / copy) * 1e3


def section_designs(run: Run) -> None:
    from fvvae_fast.ops import reference

    reps = 2 if run.dry else 10
    for shape in _shapes(run):
        for dtype, dname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            inputs = shape.inputs(dtype, run.device)
            ref = reference.forward(*[t.double() if t.is_floating_point() else t for t in inputs])
            outs = []
            for name, (fn, capturable) in _designs().items():
                slow = name == "naive-autograd"
                with run.guarded("forward", name, shape.name, dname) as ok:
                    if not ok:
                        continue
                    first_ms = wall_ms(run, lambda: outs.append(fn(*inputs)), 1)  # compilation, autotuning
                    result = {"max_rel_err": max_rel_error(outs.pop(), ref), "first_call_ms": first_ms}
                    if not run.dry:  # (the dry run's interpreter times nothing worth a second call)
                        result["wall_ms"] = wall_ms(run, lambda: fn(*inputs), 1 if slow else reps)
                        result["event_ms"] = event_ms(lambda: fn(*inputs), 1 if slow else reps)
                        if capturable:
                            attempt(result, "graph_ms", lambda: graph_ms(lambda: fn(*inputs), reps))
                        if not slow:  # thousands of kernels per call: the profiler would take minutes
                            attempt(result, "kernels", lambda: kernel_ms(lambda: fn(*inputs), 3))
                        floor = _roofline_ms(run, shape, dtype)
                        if floor:
                            result["roofline_ms"] = floor
                            result["roofline_frac"] = floor / result.get("graph_ms", result["event_ms"])
                    run.row("forward", name, shape.name, dname, **result)
            del inputs, ref


def section_wave(run: Run) -> None:
    """Time per step over one wave of CTAs, bf16 forward (the Triton launcher's choice: the tensor-descriptor
    kernel on sm_90+): as many busy programs as SMs (one CTA per SM fits), each one chunk of a set of ``length``
    rows, so each runs length / BLOCK_T steps of the loop; the forward kernel's profiler time over those steps."""
    from common import Shape

    from fvvae_fast.ops import dispatch

    fused = dispatch.import_kernels("fisher_accumulate")
    c, d, length = (32, 13, 48) if run.dry else (512, 255, 2048)  # 2048: the videos' tuning bucket (LEN_KEY)
    with run.guarded("wave", "forward per step", f"C={c} d={d} length={length}", "bf16") as ok:
        if not ok:
            return
        sms = fused._programs(run.device, 1, 4)  # SMs; a handful under the interpreter
        # autotunes at this length's key, unless the designs above did (videos: the same key)
        probe = Shape("probe", c, d, max(1, sms // 4), length).inputs(torch.bfloat16, run.device)
        tma = fused._tma_kernels()
        kernel = tma._fwd_tma[False] if tma.usable(probe[0], d) else fused._fwd["half"]
        fused.fisher_accumulate_fwd(*probe, chunk_rows=length)
        config = kernel.best_config.kwargs
        tiles = math.ceil(c / config["BLOCK_C"]) * math.ceil(d / config.get("BLOCK_J", d))  # (C, d) tiles
        shape = Shape("wave", c, d, max(1, sms // tiles), length)
        inputs = shape.inputs(torch.bfloat16, run.device)
        steps = math.ceil(length / config["BLOCK_T"])

        def fn():
            return fused.fisher_accumulate_fwd(*inputs, chunk_rows=length)

        fn()
        sync(run)
        name = kernel.base_fn.__name__
        result = {"kernel": name, **config, "sms": sms, "busy_programs": shape.sets * tiles,
                  "sets": shape.sets, "steps_per_program": steps}
        if run.dry:
            result["wall_ms_interpreted"] = wall_ms(run, fn, 1)
        else:
            ms = named_kernel_ms(fn, name, 10)
            result.update(kernel_ms=ms, us_per_step=ms * 1e3 / steps)
        run.row("wave", "forward per step", f"C={c} d={d} length={length}", "bf16", **result)


def section_chooser(run: Run) -> None:
    import fvvae_fast as fv
    from fvvae_fast.ops import dispatch

    for shape in _shapes(run):
        for dtype, dname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            with run.guarded("chooser", "pick", shape.name, dname, cuda_only=True) as ok:
                if ok:
                    dispatch.CHOOSER.rankings.clear()
                    dispatch.CHOOSER.timings.clear()
                    fv.fisher_accumulate(*shape.inputs(dtype, run.device))
                    sync(run)
                    (key, timings), = dispatch.CHOOSER.timings.items()
                    run.row("chooser", "pick", shape.name, dname, pick=dispatch.CHOOSER.rankings[key][0],
                            **{f"{k}_ms": v * 1e3 for k, v in timings.items()})


def section_backward(run: Run) -> None:
    from fvvae_fast.ops import dispatch, naive, reference

    fused = dispatch.import_kernels("fisher_accumulate")
    reps = 2 if run.dry else 10
    for shape in _shapes(run):
        for dtype, dname in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
            inputs = shape.inputs(dtype, run.device)
            grad = torch.randn((shape.sets, shape.c, shape.d + 1), device=run.device)
            want = reference.backward(grad.double(), *[t.double() if t.is_floating_point() else t for t in inputs])
            outs = []

            def plain():
                leaves = [t.detach().requires_grad_() for t in inputs[:5]]
                return torch.autograd.grad(naive.padded_bmm_accumulate(*leaves, inputs[5]), leaves, grad)

            for name, fn, capturable in (("fused", lambda: fused.fisher_accumulate_bwd(grad, *inputs), True),
                                         ("plain-torch-autograd", plain, False)):
                with run.guarded("backward", name, shape.name, dname) as ok:
                    if not ok:
                        continue
                    first_ms = wall_ms(run, lambda: outs.append(fn()), 1)
                    result = {"max_rel_err": max(max_rel_error(g, w) for g, w in zip(outs.pop(), want)),
                              "first_call_ms": first_ms}
                    if not run.dry:
                        result["wall_ms"] = wall_ms(run, fn, reps)
                        result["event_ms"] = event_ms(fn, reps)
                        if capturable:
                            attempt(result, "graph_ms", lambda: graph_ms(fn, reps))
                        attempt(result, "kernels", lambda: kernel_ms(fn, 3))
                    run.row("backward", name, shape.name, dname, **result)
            del inputs, grad, want


def _small_model(run: Run, c: int = 24, d: int = 7):
    import fvvae_fast as fv

    torch.manual_seed(0)
    return fv.FVVAE(in_dim=c, latent_dim=d, num_classes=3).to(run.device)


def section_product(run: Run, tmp: Path) -> None:
    import fvvae_fast as fv
    from fvvae_fast.ops import reference

    g = torch.Generator().manual_seed(0)
    x = torch.rand(60, 24, generator=g).to(run.device)
    offsets = torch.tensor([0, 10, 10, 35, 60], device=run.device)
    inputs = (x, torch.randn(60, 7, generator=g).to(run.device), torch.randn(24, 7, generator=g).to(run.device),
              torch.randn(24, generator=g).to(run.device), torch.ones(24, device=run.device), offsets)

    with run.guarded("product", "fisher_vectors") as ok:
        if ok:
            with torch.no_grad():
                got = fv.fisher_vectors(*inputs)
            want = reference.vectors(*[t.double() if t.is_floating_point() else t for t in inputs], None, 1e-12)
            run.row("product", "fisher_vectors", max_rel_err=max_rel_error(got, want), device=str(got.device))

    with run.guarded("product", "fisher_accumulate backward") as ok:
        if ok:
            leaves = [t.clone().requires_grad_() for t in inputs[:5]]
            fv.fisher_accumulate(*leaves, offsets).square().sum().backward()
            run.row("product", "fisher_accumulate backward", finite=all(bool(t.grad.isfinite().all()) for t in leaves))

    with run.guarded("product", "train") as ok:
        if ok:
            from fvvae_fast.sets import DescriptorSets
            from fvvae_fast.train import TrainConfig, train

            data = DescriptorSets(x.cpu(), offsets.cpu(), torch.tensor([0, 1, 2, 0]))
            config = TrainConfig(iterations=3 if run.dry else 20, batch_sets=2, lambda3=1.0, log_every=1,
                                 device=str(run.device))
            result = train(_small_model(run), data, config, progress=False)
            run.row("product", "train", iterations=config.iterations, last=result.history[-1])

    with run.guarded("product", "FisherVectorHead") as ok:
        if ok:
            head = fv.FisherVectorHead(_small_model(run))
            xs = x.clone().requires_grad_()
            out = head(xs, offsets)
            out.sum().backward()
            run.row("product", "FisherVectorHead", out_shape=tuple(out.shape), finite_grad=bool(xs.grad.isfinite().all()))

    with run.guarded("product", "finetune") as ok:
        if ok:
            from fvvae_fast.finetune import FinetuneConfig, finetune
            from fvvae_fast.pipelines import ImageSource, build_backbone, read_folder

            root = _images(tmp / "images")
            backbone = build_backbone("mobilenet_v3_small", "features.4", random_weights=True)
            config = FinetuneConfig(mode="head", iterations=2, batch_items=4, latent_dim=4, lambda3=1.0, log_every=1,
                                    device=str(run.device))
            result = finetune(backbone, ImageSource(size=32), read_folder(root).split("train"), config, progress=False)
            run.row("product", "finetune", steps=config.iterations, last=result.history[-1])

    with run.guarded("product", "descriptors --decoder torchcodec-cuda", cuda_only=True) as ok:
        if ok:
            _descriptors_on_gpu(run, tmp)

    with run.guarded("product", "nccl one-rank group", cuda_only=True) as ok:
        if ok:
            _nccl(run)


def _images(root: Path) -> Path:
    """root/train/{a,b}/*.png: 4 tiny noise images per class."""
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    for cls in ("a", "b"):
        for i in range(4):
            path = root / "train" / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(torch.randint(0, 255, (24, 24, 3), generator=g, dtype=torch.uint8).numpy()).save(path)
    return root


def _descriptors_on_gpu(run: Run, tmp: Path) -> None:
    """A generated clip per class through ``fvvae descriptors --decoder torchcodec-cuda --device cuda``."""
    try:
        import av
        import numpy as np
        import torchcodec  # noqa: F401
    except (ImportError, OSError, RuntimeError) as err:  # torchcodec without FFmpeg's libraries raises at import
        run.row("product", "descriptors --decoder torchcodec-cuda", skipped=f"not usable here: {err}")
        return
    from fvvae_fast.cli import main

    root = tmp / "videos"
    for k, cls in enumerate(("a", "b")):
        path = root / "train" / cls / f"{cls}.mp4"
        path.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(path), "w") as container:
            stream = container.add_stream("mpeg4", rate=10)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for i in range(8):
                img = np.full((48, 64, 3), 10 + 20 * i + 40 * k, np.uint8)
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    code = main(["descriptors", "--dataset", "folder", "--root", str(root), "--backbone", "mobilenet_v3_small",
                 "--layer", "features.4", "--random-weights", "--frames", "3", "--size", "64", "--workers", "0",
                 "--decoder", "torchcodec-cuda", "--device", "cuda", "--out", str(tmp / "store"), "--quiet"])
    run.row("product", "descriptors --decoder torchcodec-cuda", exit_code=code,
            files=sorted(p.name for p in (tmp / "store").iterdir()) if (tmp / "store").is_dir() else [])


def _nccl(run: Run) -> None:
    import torch.distributed as dist

    from fvvae_fast.distributed import shutdown

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        t = torch.arange(4.0, device=run.device)
        dist.all_reduce(t)  # the package skips collectives at world size 1: called directly, NCCL runs
        dist.barrier()
        run.row("product", "nccl one-rank group", backend=dist.get_backend(), all_reduce=t.tolist())
    finally:
        shutdown()


def section_ncu(run: Run, out: Path) -> None:
    """Nsight Compute on one call of the op's chosen bf16 forward at the videos shape, clocks left alone."""
    with run.guarded("ncu", "chosen forward", "videos", "bf16", cuda_only=True) as ok:
        if not ok:
            return
        ncu = shutil.which("ncu")
        if ncu is None:
            run.row("ncu", "chosen forward", "videos", "bf16", skipped="ncu not installed")
            return
        script = ("import sys; sys.path[:0] = [%r, %r]; import torch, fvvae_fast as fv; from common import Shape; "
                  "a = Shape('videos', 512, 255, 64, 1250).inputs(torch.bfloat16, torch.device('cuda')); "
                  "fv.fisher_accumulate(*a); torch.cuda.synchronize(); fv.fisher_accumulate(*a); torch.cuda.synchronize()"
                  % (str(ROOT), str(HERE)))
        cmd = [ncu, "--clock-control", "none", "--section", "SpeedOfLight", "--section", "Occupancy", "--csv",
               sys.executable, "-c", script]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=max(10, min(120, run.left())))
        (out / "ncu.csv").write_text(done.stdout)
        run.row("ncu", "chosen forward", "videos", "bf16", exit_code=done.returncode, stderr=done.stderr[-300:],
                csv="ncu.csv")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_run_out"))
    parser.add_argument("--budget", type=float, default=480.0, help="seconds after which no new work starts")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_run: error: no CUDA device (use --dry-run to check the plumbing on a CPU)", file=sys.stderr)
        return 2
    for name in ("FVVAE_DESIGN", "FVVAE_DESIGN_CACHE"):  # the chooser times every design here
        os.environ.pop(name, None)
    run = Run(args.out, args.budget, args.dry_run)
    section_env(run)
    section_ceilings(run)
    section_designs(run)
    section_wave(run)
    section_chooser(run)
    section_backward(run)
    with tempfile.TemporaryDirectory() as tmp:
        section_product(run, Path(tmp))
    section_ncu(run, args.out)
    run.row("done", "total", seconds=round(time.monotonic() - run.start, 1))
    return 0


if __name__ == "__main__":
    if "--dry-run" in sys.argv:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports Triton
    sys.exit(main())
