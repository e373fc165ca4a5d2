"""Triton kernels of fvvae_fast, shipped as ``fvvae_fast.kernels`` (imported lazily: Triton is optional)."""
