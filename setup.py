"""Build and install fvvae_fast.

The Triton kernels live in the top-level ``kernels/`` folder and ship as the
sub-package ``fvvae_fast.kernels``. The C++ CPU kernel in ``csrc/`` is an optional
extension (``fvvae_fast._C``): without a compiler the install still succeeds and
the package falls back to the reference path.
"""

from __future__ import annotations

import ast
import glob
import os
import sys

from setuptools import setup

PIPELINES = ["torchvision", "av", "pillow", "scikit-learn", "matplotlib", "opencv-python-headless"]


def package_version() -> str:
    """fvvae_fast.__version__, read without importing the package (that imports torch)."""
    with open(os.path.join("fvvae_fast", "__init__.py")) as f:
        tree = ast.parse(f.read())
    return next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(target, "id", None) == "__version__" for target in node.targets))


ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
if sources and os.environ.get("FVVAE_NO_EXTENSION", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # The kernels parallelise with OpenMP (the runtime torch already loads). Apple clang has
    # no -fopenmp: there the kernels build and run on one thread. The build stays portable
    # (no -march=native): the element-wise loops carry their own AVX2/AVX-512 clones, and
    # -fno-math-errno lets them vectorise sqrt and exp (nothing reads errno).
    if sys.platform == "win32":
        compile_args, link_args = ["/O2", "/openmp"], []
    elif sys.platform == "darwin":
        compile_args, link_args = ["-O3", "-ffp-contract=fast", "-fno-math-errno"], []
    else:
        compile_args, link_args = ["-O3", "-fopenmp", "-ffp-contract=fast", "-fno-math-errno"], ["-fopenmp"]
    ext_modules.append(
        CppExtension(
            "fvvae_fast._C",
            sources,
            extra_compile_args=compile_args,
            extra_link_args=link_args,
            optional=True,
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=False)

setup(
    name="fvvae_fast",
    version=package_version(),
    description="Fast Fisher vectors with a variational auto-encoder (FV-VAE, Qiu et al., CVPR 2017)",
    python_requires=">=3.10",
    packages=["fvvae_fast", "fvvae_fast.ops", "fvvae_fast.kernels", "fvvae_fast.fim", "fvvae_fast.pipelines",
              "fvvae_fast.baselines", "fvvae_fast.evaluation"],
    package_dir={"fvvae_fast.kernels": "kernels"},
    package_data={"fvvae_fast": ["py.typed"]},  # the type hints are part of the API (PEP 561)
    install_requires=["torch>=2.4", "numpy", "scipy", "tqdm", "packaging", 'tomli; python_version < "3.11"'],
    extras_require={
        # Descriptor sources, backbones, evaluation and its figures. torchvision is not a hard requirement: an
        # unpinned torchvision can pull in another torch; install the one matching your torch.
        "pipelines": PIPELINES,
        "yaml": ["pyyaml"],
        "dev": [*PIPELINES, "pytest", "pytest-benchmark", "hypothesis", "tensorboard", "timm", "sphinx", "pandas",
                "scikit-image"],
    },
    entry_points={"console_scripts": ["fvvae = fvvae_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
