"""W8A16 quantization (spec §5.8, invariant 29), the CPU path and the dispatcher, against the reference."""

from __future__ import annotations

import pytest
import torch

from recmix.kernels import w8a16, w8a16_cpu
from recmix.kernels.w8a16 import pertoken_linear_w8a16, resolve_backend
from recmix.kernels.w8a16_cpu import pertoken_linear_w8a16_cpu
from recmix.kernels.w8a16_reference import dequantize_w8a16, expand_scales, pertoken_linear_w8a16_reference, quantize_w8a16
from recmix.platform.specs.w8a16 import Granularity, KernelBackend


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


@pytest.mark.parametrize("granularity", list(Granularity))
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 45, 33), (2, 300, 17), (4, 256, 64)])
def test_roundtrip_error_is_at_most_half_a_step(granularity, shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[2])  # columns of very different magnitude
    q, s = quantize_w8a16(w, granularity)
    assert q.dtype == torch.int8 and s.dtype == torch.float16
    assert int(q.abs().max()) <= 127
    s_full = expand_scales(s, shape[1])
    err = (w - dequantize_w8a16(q, s)).abs()
    # q was rounded against the stored fp16 s, so the bound holds for s itself, up to fp32 arithmetic
    assert bool((err <= s_full / 2 * (1 + 1e-5) + 1e-12).all()), float((err / s_full).max())
    # every channel (group) uses its full range: the largest |q| is 127 where the column is non-zero
    assert int(q.abs().amax(dim=1).min()) == 127


def test_per_group_scales_follow_the_group():
    torch.manual_seed(1)
    w = torch.randn(2, 300, 5)
    w[:, 128:256] *= 100.0  # group 1 is loud: its scale must not leak into groups 0 and 2
    q, s = quantize_w8a16(w, "per_group")
    assert s.shape == (2, 3, 5)
    assert float(s[:, 1].float().min()) > 20 * float(s[:, 0].float().max())
    _, s_ch = quantize_w8a16(w, "per_channel")
    e_group = (w - dequantize_w8a16(q, s)).abs()[:, :128].max()
    e_chan = (w - dequantize_w8a16(*quantize_w8a16(w, "per_channel"))).abs()[:, :128].max()
    assert e_group * 20 < e_chan
    assert s_ch.shape == (2, 5)


def test_zero_and_tiny_columns_are_guarded():
    w = torch.zeros(2, 8, 4)
    w[0, :, 1] = 1e-9  # below fp16's smallest scale: must not round the scale to 0 (0/0 -> nan)
    w[1, 3, 2] = -2.0
    q, s = quantize_w8a16(w)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    assert int(q[0, :, 0].abs().max()) == 0 and int(q[1, 3, 2]) == -127
    assert bool(torch.isfinite(dequantize_w8a16(q, s)).all())


def test_bad_inputs_raise_value_errors_naming_values():
    with pytest.raises(ValueError, match=r"\(T, I, O\)"):
        quantize_w8a16(torch.randn(4, 4))
    with pytest.raises(ValueError, match="inf/nan"):
        quantize_w8a16(torch.full((1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="fp16 max"):
        quantize_w8a16(torch.full((1, 2, 2), 1e8))
    q, s = quantize_w8a16(torch.randn(2, 8, 4))
    with pytest.raises(ValueError, match=r"scale shape \(2, 5\)"):
        pertoken_linear_w8a16(torch.randn(3, 2, 8), q, torch.ones(2, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"x shape \(3, 2, 9\)"):
        pertoken_linear_w8a16(torch.randn(3, 2, 9), q, s)
    with pytest.raises(ValueError, match=r"bias shape \(4,\)"):
        pertoken_linear_w8a16(torch.randn(3, 2, 8), q, s, torch.zeros(4))


@pytest.mark.parametrize("granularity", list(Granularity))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_output_within_1e2_of_the_16bit_layer_and_half_the_bytes(granularity, dtype):
    """Invariant 29 on a per-token SwiGLU-like up-projection shape (reduced)."""
    torch.manual_seed(2)
    T, I, O, B = 4, 256, 128, 8
    w = torch.randn(T, I, O) / I**0.5
    b = torch.randn(T, O) * 0.1
    x = torch.randn(B, T, I).to(dtype)
    y16 = (torch.bmm(x.float().transpose(0, 1), w.to(dtype).float()).transpose(0, 1) + b.to(dtype).float()).to(dtype)
    q, s = quantize_w8a16(w, granularity)
    y8 = pertoken_linear_w8a16(x, q, s, b)
    assert y8.dtype == dtype and y8.shape == (B, T, O)
    assert rel_err(y8, y16) < 1e-2
    bytes8 = q.numel() * q.element_size() + s.numel() * s.element_size()
    bytes16 = w.numel() * 2
    assert 0.5 <= bytes8 / bytes16 <= 0.5 + 2.0 / 128  # 1 + 2/g bytes per weight vs 2


# I = 45, 24 and 1 are not multiples of 16 (torch._weight_int8pack_mm segfaults there: a regression crashes
# the run); the last two sit on either side of INT8PACK_MAX_ROWS, where the CPU path switches from int8pack to
# the int8 -> fp32 bmm
ABOVE = w8a16_cpu.INT8PACK_MAX_ROWS + 1


@pytest.mark.parametrize("B,T,I,O", [(1, 1, 1, 1), (3, 2, 45, 33), (4, 2, 24, 20), (5, 3, 64, 20), (ABOVE, 2, 40, 24),
                                     (w8a16_cpu.INT8PACK_MAX_ROWS, 4, 256, 96)])
@pytest.mark.parametrize("granularity", list(Granularity))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_path_matches_reference(B, T, I, O, granularity, dtype):
    torch.manual_seed(3)
    q, s = quantize_w8a16(torch.randn(T, I, O), granularity)
    x = torch.randn(B, T, I).to(dtype)
    b = torch.randn(T, O)
    ref = pertoken_linear_w8a16_reference(x, q, s, b)
    out = pertoken_linear_w8a16_cpu(x, q, s, b)
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < 1e-2
    # a checker that cannot reject is useless: a weight with one token's bank swapped must fail it
    if T > 1:
        wrong = pertoken_linear_w8a16_cpu(x, q.flip(0), s.flip(0), b)
        assert rel_err(wrong, ref) > 0.1


def test_cpu_path_does_not_need_contiguous_output_major_q():
    torch.manual_seed(4)
    q, s = quantize_w8a16(torch.randn(3, 64, 32))
    x = torch.randn(4, 3, 64)
    assert rel_err(pertoken_linear_w8a16_cpu(x, q.contiguous(), s), pertoken_linear_w8a16_reference(x, q, s)) < 1e-2


def test_auto_backend_follows_the_device():
    assert resolve_backend(KernelBackend.auto, "cpu") is KernelBackend.cpu
    assert resolve_backend("reference", "cpu") is KernelBackend.reference
    with pytest.raises(ValueError, match="'cuda' is not a valid KernelBackend"):
        resolve_backend("cuda", "cpu")


def _spy(monkeypatch, name: str) -> list:
    """Replace the dispatcher's `name` by a wrapper that records each call, then runs the original."""
    calls: list = []
    real = getattr(w8a16, name)

    def spy(*a, **kw):
        calls.append(name)
        return real(*a, **kw)

    monkeypatch.setattr(w8a16, name, spy)
    return calls


@pytest.mark.parametrize("backend,expected", [(KernelBackend.reference, "pertoken_linear_w8a16_reference"),
                                              ("cpu", "pertoken_linear_w8a16_cpu"),
                                              (KernelBackend.auto, "pertoken_linear_w8a16_cpu")])
def test_backend_override_picks_that_backend(monkeypatch, backend, expected):
    """Fails if the dispatcher ignores `backend`: each backend's entry point is spied on, only one may run."""
    ref_calls = _spy(monkeypatch, "pertoken_linear_w8a16_reference")
    cpu_calls = _spy(monkeypatch, "pertoken_linear_w8a16_cpu")
    x = torch.randn(2, 1, 8)
    q, s = quantize_w8a16(torch.randn(1, 8, 3))
    y = pertoken_linear_w8a16(x, q, s, backend=backend)
    assert ref_calls + cpu_calls == [expected]
    assert rel_err(y, pertoken_linear_w8a16_reference(x, q, s)) < 1e-2


def test_quantized_layer_keeps_its_configured_backend(monkeypatch):
    """The backend is fixed when the layer is built (no environment read per call) and reaches the dispatcher."""
    from recmix.models.quantize import W8A16PerTokenLinear

    w = torch.randn(2, 16, 8)
    x = torch.randn(3, 2, 16)
    for backend, expected in ((KernelBackend.reference, "pertoken_linear_w8a16_reference"), (KernelBackend.cpu, "pertoken_linear_w8a16_cpu")):
        monkeypatch.undo()
        ref_calls = _spy(monkeypatch, "pertoken_linear_w8a16_reference")
        cpu_calls = _spy(monkeypatch, "pertoken_linear_w8a16_cpu")
        layer = W8A16PerTokenLinear.from_float(w, None, Granularity.per_channel, backend)
        layer(x)
        layer.forward_banks(x[:, :1], 0, 1)
        assert ref_calls + cpu_calls == [expected, expected], backend


def test_bench_candidates_compute_the_same_matmul():
    """Every CPU candidate `recmix bench w8a16` times is a correct W8A16 / baseline matmul (T, M)-major."""
    from recmix.jobs.bench import w8a16 as bench

    w, q, s = bench._weights("cpu")
    for M in (1, 20):
        outs = {k: fn() for k, fn in bench._cpu_cases(M, w, q, s).items()}
        ref = outs.pop("fp32")
        for k, y in outs.items():
            y_TMO = torch.stack(y) if isinstance(y, list) else y
            if y_TMO.shape != ref.shape:  # the dispatcher returns (M, T, O)
                y_TMO = y_TMO.transpose(0, 1)
            assert rel_err(y_TMO, ref) < 1e-2, (M, k)
