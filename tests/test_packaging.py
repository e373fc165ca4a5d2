"""The package imports and works without Triton and without the compiled extension."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_works_without_triton_and_extension():
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["triton"] = None          # import triton -> ImportError
        sys.modules["fvvae_fast._C"] = None   # the extension is not built
        import torch
        import fvvae_fast as fv
        from fvvae_fast.ops import dispatch
        assert dispatch.available("triton", torch.device("cpu")) is not None
        x, z = torch.rand(5, 4), torch.randn(5, 3)
        w, b, v = torch.randn(4, 3), torch.randn(4), torch.ones(4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                G = fv.fisher_accumulate(x, z, w, b, v, torch.tensor([0, 2, 5]))
        assert G.shape == (2, 4, 4)
        said = [w for w in caught if "using the reference implementation" in str(w.message)]
        assert len(said) == 1, said
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_setup_lists_every_subpackage():
    """A sub-package missing from setup.py works in an editable install and vanishes from a wheel."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    call = next(n for n in ast.walk(ast.parse((root / "setup.py").read_text()))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    listed = set(ast.literal_eval(next(k.value for k in call.keywords if k.arg == "packages")))
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "fvvae_fast").rglob("__init__.py")}
    found.add("fvvae_fast.kernels")
    assert found == listed
    # PEP 561: the type hints ship with the package (.ci/check_wheel.py checks the wheel holds the marker)
    package_data = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "package_data"))
    assert (root / "fvvae_fast" / "py.typed").is_file() and "py.typed" in package_data["fvvae_fast"]
    assert "fvvae_fast/py.typed" in (root / "MANIFEST.in").read_text()


def test_public_api_of_the_design():
    """docs/api.rst: the names outside tests call, at the top level of the package."""
    import inspect

    import fvvae_fast as fv

    for name in ("fisher_accumulate", "FVVAE", "fisher_encode", "spp", "load_official", "FisherInformation",
                 "FVVAEEncoder", "FisherVectorHead"):
        assert callable(getattr(fv, name)), name
    assert list(inspect.signature(fv.fisher_encode).parameters)[:5] == ["model", "x", "offsets", "fim", "normalize"]
    assert list(inspect.signature(fv.FisherVectorHead).parameters) == ["model", "fim", "normalize"]
    assert list(inspect.signature(fv.fisher_accumulate).parameters)[:6] == ["x", "z", "weight", "bias", "inv_var",
                                                                             "offsets"]
    fim = fv.FisherInformation(mode="lowrank", rank=2, damping=0.0)
    assert fim.mode == "lowrank" and fim.rank == 2


def test_scikit_learn_is_optional():
    """`import fvvae_fast` needs no scikit-learn; FVVAEEncoder says how to get it."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["sklearn"] = None         # import sklearn -> ImportError
        import fvvae_fast as fv
        from fvvae_fast import *
        assert "FVVAEEncoder" in dir(fv)
        try:
            fv.FVVAEEncoder
        except ImportError as err:
            assert "pip install scikit-learn" in str(err), err
            print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_kernels_come_from_the_checkout_of_the_package():
    """A plain checkout (PYTHONPATH=<repo>, no install) runs its own top-level kernels/ as fvvae_fast.kernels."""
    from pathlib import Path

    import pytest

    pytest.importorskip("triton")
    import fvvae_fast
    from fvvae_fast.ops import dispatch

    package = Path(fvvae_fast.__file__).resolve().parent
    kernels = dispatch.import_kernels("fisher_accumulate")
    folder = package / "kernels" if (package / "kernels").is_dir() else package.parent / "kernels"  # wheel or checkout
    assert Path(kernels.__file__).resolve() == folder / "fisher_accumulate.py"
    assert dispatch.import_kernels("sum_of_squares").__name__ == "fvvae_fast.kernels.sum_of_squares"


def test_the_package_imports_lazily_and_gives_every_name():
    """`import fvvae_fast` imports no torch; each public name and sub-package comes on first use, and
    importing the modules `train` and `spp` leaves the functions of those names on the package."""
    import subprocess
    import sys

    code = ("import sys, fvvae_fast as fv; assert 'torch' not in sys.modules\n"
            "import fvvae_fast.train, fvvae_fast.spp\n"
            "assert callable(fv.train) and callable(fv.spp) and fv.ops.sum_of_squares and fv.fim.FisherInformation\n"
            "assert all(getattr(fv, n) is not None for n in fv.__all__)\n"
            "try:\n    fv.no_such_name\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no error')")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_custom_ops_exist_after_import_fvvae_fast():
    """torch.ops.fvvae_fast.* after `import fvvae_fast`, whether torch comes before or after it; the ops'
    modules are imported only when the namespace is first looked up."""
    code = textwrap.dedent(
        """
        import sys
        {first}
        assert "fvvae_fast.ops" not in sys.modules
        ops = torch.ops.fvvae_fast
        assert callable(ops.fisher_accumulate) and callable(ops.sum_of_squares) and callable(ops.train_step_cpu)
        assert "fvvae_fast.model" not in sys.modules
        print("ok")
        """
    )
    for first in ("import fvvae_fast, torch", "import torch, fvvae_fast"):
        result = subprocess.run([sys.executable, "-c", code.format(first=first)], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0 and result.stdout.strip() == "ok", (first, result.stderr)


def _module_imports(root):
    """{module: the package modules it imports when it is imported} from the top-level import statements of every
    module under ``root`` (imports inside functions and under ``if TYPE_CHECKING`` run later, or never)."""
    import ast

    package = root.name
    modules = {".".join((package, *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([here.rsplit(".", node.level - 1)[0]] + ([base] if base else []))
                edges |= {m for m in (base, *(f"{base}.{a.name}" for a in node.names)) if m in modules}
            elif isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
        for target in list(edges):  # importing a.b.c runs a.b's __init__ first
            parts = target.split(".")
            edges |= {".".join(parts[:k]) for k in range(2, len(parts)) if ".".join(parts[:k]) in modules}
        graph[name] = {t for t in edges if not (name == t or name.startswith(t + "."))}  # its packages: begun
    return graph


def test_no_import_cycle():
    """No module imports, at its top level, one that imports it back (a cycle: `import fvvae_fast.sets` in a fresh
    process failed while the test suite's import order hid it)."""
    from pathlib import Path

    graph = _module_imports(Path(__file__).resolve().parents[1] / "fvvae_fast")
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_sets_import_first_in_a_fresh_process():
    """What the static check above guards, seen once for real: the cycle sets -> ops -> naive -> sets failed here."""
    subprocess.run([sys.executable, "-c", "import fvvae_fast.sets"], check=True, capture_output=True)


def test_short_reprs():
    import torch

    import fvvae_fast as fv
    from fvvae_fast.train import TrainResult

    data = fv.DescriptorSets(torch.zeros(1000, 3), torch.tensor([0, 400, 1000]), torch.tensor([0, 1]))
    assert repr(data) == "DescriptorSets(sets=2, rows=1000, dim=3, dtype=torch.float32, labels=yes)"
    assert repr(fv.DescriptorSets(torch.zeros(2, 3).numpy(), [0, 2])).endswith("dtype=float32, labels=no)")
    result = TrainResult(fv.FVVAE(3, 2), history=[{"total": 1.0}] * 500)
    assert repr(result) == "TrainResult(model=FVVAE(in_dim=3, latent_dim=2), history=500 logged iterations, " \
                           "resumed_from=0)"
