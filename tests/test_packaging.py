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


def test_public_api_of_the_design():
    """DESIGN section 3: the names outside tests call, at the top level of the package."""
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
