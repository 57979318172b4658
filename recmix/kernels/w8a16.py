"""W8A16 dispatcher: one per-token W8A16 matmul, run by the backend the caller fixed (spec §5.8).

Legend as in recmix.kernels.w8a16_reference. The backend is a `KernelBackend` chosen once, when the
quantized layers are built (`W8A16Config.backend`, stored on each layer), never read from the environment:
    triton     recmix.kernels.w8a16_triton (CUDA; on CPU only under TRITON_INTERPRET=1, the tests)
    cpu        recmix.kernels.w8a16_cpu, the measured-fastest CPU path
    reference  recmix.kernels.w8a16_reference: dequantize to fp32, then bmm
    auto       by the tensor's device: triton on CUDA when triton is installed, cpu on CPU, else reference
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from recmix.kernels.w8a16_cpu import pertoken_linear_w8a16_cpu
from recmix.kernels.w8a16_reference import GROUP_SIZE, pertoken_linear_w8a16_reference
from recmix.platform.specs.w8a16 import KernelBackend


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: KernelBackend | str, device: torch.device | str) -> KernelBackend:
    """The concrete backend for `backend` on `device`; raises ValueError when triton is asked for but missing."""
    backend = KernelBackend(backend)
    device = torch.device(device)
    if backend is KernelBackend.triton and not triton_available():
        raise ValueError("W8A16 backend 'triton' requested but the triton package is not installed")
    if backend is not KernelBackend.auto:
        return backend
    if device.type == "cuda" and triton_available():
        return KernelBackend.triton
    return KernelBackend.cpu if device.type == "cpu" else KernelBackend.reference


def pertoken_linear_w8a16(
    x_BTI: torch.Tensor,
    q_TIO: torch.Tensor,
    s_TO: torch.Tensor,
    b_TO: Optional[torch.Tensor] = None,
    *,
    group_size: int = GROUP_SIZE,
    backend: KernelBackend = KernelBackend.auto,
) -> torch.Tensor:
    """y_BTO = x_BTI @ (s * q)_TIO + b_TO per token. `s_TO` may also be per-group scales s_TGO."""
    backend = resolve_backend(backend, x_BTI.device)
    if backend is KernelBackend.triton:
        from recmix.kernels.w8a16_triton import pertoken_linear_w8a16_triton  # imports triton: only when asked

        return pertoken_linear_w8a16_triton(x_BTI, q_TIO, s_TO, b_TO, group_size=group_size)
    if backend is KernelBackend.cpu:
        return pertoken_linear_w8a16_cpu(x_BTI, q_TIO, s_TO, b_TO, group_size=group_size)
    return pertoken_linear_w8a16_reference(x_BTI, q_TIO, s_TO, b_TO, group_size=group_size)
