"""The Triton W8A16 kernel, run by Triton's CPU interpreter (TRITON_INTERPRET=1), against the reference.

The interpreter is numpy-speed: shapes stay tiny. They are chosen to hit every edge: size 1 in every
dimension, T = 1, M = 1, I and O not multiples of the blocks, several K steps, several scale groups.
"""

from __future__ import annotations

import importlib
import os

import pytest

# Must be set before the kernel module is decorated by @triton.jit (it reads the flag at import).
os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

import torch  # noqa: E402

import recmix.kernels.w8a16_triton as w8a16_triton  # noqa: E402
from recmix.kernels.w8a16 import pertoken_linear_w8a16  # noqa: E402
from recmix.kernels.w8a16_reference import GROUP_SIZE, pertoken_linear_w8a16_reference, quantize_w8a16  # noqa: E402
from recmix.platform.specs.w8a16 import Granularity, KernelBackend  # noqa: E402

# Another test module may have imported the kernel module without the flag: decorate it again.
if type(w8a16_triton._w8a16_pertoken_kernel).__name__ != "InterpretedFunction":
    w8a16_triton = importlib.reload(w8a16_triton)

SMALL = (16, 16, 16)  # small blocks: more tiles and K steps on tiny shapes


def check(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """The checker: shape, dtype, and element-wise closeness scaled to the output's magnitude."""
    assert y.shape == ref.shape and y.dtype == ref.dtype, (y.shape, ref.shape, y.dtype, ref.dtype)
    tol = {torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype] * float(ref.float().abs().max().clamp_min(1.0))
    err = float((y.float() - ref.float()).abs().max())
    assert err <= tol, f"max abs err {err:.3g} > tol {tol:.3g}"


def case(B, T, I, O, granularity, dtype, bias, group_size=GROUP_SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(T, I, O, generator=g) * torch.logspace(-2, 0, O)
    q, s = quantize_w8a16(w, granularity, group_size)
    x = torch.randn(B, T, I, generator=g).to(dtype)
    b = torch.randn(T, O, generator=g) if bias else None
    return x, q, s, b


SHAPES = [
    # B, T, I, O
    (1, 1, 1, 1),
    (1, 3, 45, 33),
    (5, 1, 17, 70),
    (19, 2, 40, 3),
]


@pytest.mark.parametrize("B,T,I,O", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_reference_per_channel(B, T, I, O, dtype):
    x, q, s, b = case(B, T, I, O, Granularity.per_channel, dtype, bias=(B % 2 == 1))
    ref = pertoken_linear_w8a16_reference(x, q, s, b)
    check(w8a16_triton.pertoken_linear_w8a16_triton(x, q, s, b, blocks=SMALL), ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_matches_reference_per_group(dtype):
    # group 16 = one BLOCK_K of 16; I = 45 -> 3 groups, the last one short
    x, q, s, b = case(3, 2, 45, 21, Granularity.per_group, dtype, bias=True, group_size=16)
    assert s.shape == (2, 3, 21)
    ref = pertoken_linear_w8a16_reference(x, q, s, b, group_size=16)
    check(w8a16_triton.pertoken_linear_w8a16_triton(x, q, s, b, group_size=16, blocks=SMALL), ref, dtype)


def test_kernel_default_blocks_and_spec_group_size():
    # default launcher blocks (BLOCK_K 32) with the spec's g = 128: two groups over I = 130
    x, q, s, b = case(2, 1, 130, 20, Granularity.per_group, torch.float16, bias=False)
    check(w8a16_triton.pertoken_linear_w8a16_triton(x, q, s, b), pertoken_linear_w8a16_reference(x, q, s, b), torch.float16)


def test_kernel_reads_strided_inputs():
    # q as a contiguous (T, I, O) tensor instead of output-major storage; x a non-contiguous slice
    x, q, s, b = case(3, 2, 20, 18, Granularity.per_channel, torch.float16, bias=True)
    x_wide = torch.zeros(3, 2, 40, dtype=torch.float16)
    x_wide[:, :, ::2] = x
    xs = x_wide[:, :, ::2]
    ref = pertoken_linear_w8a16_reference(x, q, s, b)
    check(w8a16_triton.pertoken_linear_w8a16_triton(xs, q.contiguous(), s, b, blocks=SMALL), ref, torch.float16)


def test_fp32_activations_run_as_bf16_and_come_back_fp32():
    x, q, s, b = case(2, 2, 24, 17, Granularity.per_channel, torch.float32, bias=False)
    y = w8a16_triton.pertoken_linear_w8a16_triton(x, q, s, b, blocks=SMALL)
    assert y.dtype == torch.float32
    check(y.to(torch.bfloat16), pertoken_linear_w8a16_reference(x.to(torch.bfloat16), q, s, b), torch.bfloat16)


def skip_scales_kernel(x, q, s, b, **kw):
    """A deliberately wrong kernel: the real one fed unit scales, i.e. a kernel that never applies s."""
    return w8a16_triton.pertoken_linear_w8a16_triton(x, q, torch.ones_like(s), b, **kw)


@pytest.mark.parametrize("granularity", list(Granularity))
def test_checker_rejects_a_kernel_that_skips_the_scales(granularity):
    x, q, s, b = case(3, 2, 45, 33, granularity, torch.float16, bias=False, group_size=16)
    ref = pertoken_linear_w8a16_reference(x, q, s, b, group_size=16)
    wrong = skip_scales_kernel(x, q, s, b, group_size=16, blocks=SMALL)
    with pytest.raises(AssertionError, match="max abs err"):
        check(wrong, ref, torch.float16)


def test_checker_rejects_a_transposed_weight():
    x, q, s, b = case(2, 2, 24, 24, Granularity.per_channel, torch.float16, bias=False)
    ref = pertoken_linear_w8a16_reference(x, q, s, b)
    wrong = w8a16_triton.pertoken_linear_w8a16_triton(x, q.transpose(1, 2), s, b, blocks=SMALL)
    with pytest.raises(AssertionError, match="max abs err"):
        check(wrong, ref, torch.float16)


def test_dispatcher_override_reaches_the_kernel(monkeypatch):
    """backend=triton on CPU tensors must launch the (interpreted) kernel: spied on, so ignoring it fails."""
    calls = []
    real = w8a16_triton.pertoken_linear_w8a16_triton
    monkeypatch.setattr(w8a16_triton, "pertoken_linear_w8a16_triton", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x, q, s, b = case(4, 2, 33, 19, Granularity.per_channel, torch.float16, bias=True)
    check(pertoken_linear_w8a16(x, q, s, b, backend=KernelBackend.triton), pertoken_linear_w8a16_reference(x, q, s, b), torch.float16)
    assert calls == [1]


def test_launcher_rejects_bad_blocks():
    x, q, s, b = case(2, 1, 40, 8, Granularity.per_group, torch.float16, bias=False, group_size=16)
    with pytest.raises(ValueError, match="multiple of BLOCK_K 32"):
        w8a16_triton.pertoken_linear_w8a16_triton(x, q, s, b, group_size=16, blocks=(16, 16, 32))
    with pytest.raises(ValueError, match="blocks >= 16"):
        w8a16_triton.pertoken_linear_w8a16_triton(x, q, s, b, group_size=16, blocks=(8, 16, 16))
