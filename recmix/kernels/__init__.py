"""Compute kernels, each beside its readable PyTorch reference, behind a dispatcher."""
