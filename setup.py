"""Build and install fvvae_fast.

The Triton kernels live in the top-level ``kernels/`` folder and ship as the
sub-package ``fvvae_fast.kernels``. The C++ CPU kernel in ``csrc/`` is an optional
extension (``fvvae_fast._C``): without a compiler the install still succeeds and
the package falls back to the reference path.
"""

from __future__ import annotations

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}
sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
if sources and os.environ.get("FVVAE_NO_EXTENSION", "0") != "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules.append(
        CppExtension(
            "fvvae_fast._C",
            sources,
            extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast"],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=False)

setup(
    name="fvvae_fast",
    version="0.1.0",
    description="Fast Fisher vectors with a variational auto-encoder (FV-VAE, Qiu et al., CVPR 2017)",
    python_requires=">=3.10",
    packages=["fvvae_fast", "fvvae_fast.ops", "fvvae_fast.kernels"],
    package_dir={"fvvae_fast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "tqdm", "packaging"],
    extras_require={
        "dev": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            "scikit-learn",
            "scipy",
            "tensorboard",
            "matplotlib",
        ],
    },
    entry_points={"console_scripts": ["fvvae = fvvae_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
