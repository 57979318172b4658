"""Post-training W8A16 quantization of a trained model (spec §5.8) and its export / load.

Legend: T tokens (weight banks), I input width, O output width, G scale groups along I.

`quantize_model` walks `model.modules()` and swaps every `PerTokenLinear` that `targets` selects for a
`W8A16PerTokenLinear`: int8 q and fp16 scales as registered buffers (so `state_dict` carries them and
`torch.load(weights_only=True)` reads them back), forward through `pertoken_linear_w8a16`. With `tokenizer`
or `heads` in targets, plain `nn.Linear` layers under those modules are swapped too, as one-bank (T = 1)
layers. Never quantized (spec): embeddings, norms, routers.

Which part of the model a layer belongs to is read from its qualified module name [choice]: a path
component containing "router" -> never; "tokenizer" -> tokenizer; starting with "head" -> heads; any other
PerTokenLinear -> per_token_ffn (per-token FFN / expert weights, the default target).
"""

from __future__ import annotations

import io
from typing import Iterable, Optional

import torch
from torch import nn

from recmix.kernels.w8a16 import pertoken_linear_w8a16, resolve_backend
from recmix.kernels.w8a16_reference import GROUP_SIZE, quantize_w8a16
from recmix.models.token_layers import PerTokenLinear
from recmix.platform import storage
from recmix.platform.errors import RecmixError
from recmix.platform.specs.data import StorageConfig
from recmix.platform.specs.w8a16 import Granularity, KernelBackend, Target, W8A16Config

FORMAT = "recmix.w8a16"
FORMAT_VERSION = 1


class W8A16PerTokenLinear(nn.Module):
    """Inference-only per-token linear on int8 weights; q is stored output-major as q_TOI (see w8a16.py)."""

    def __init__(
        self, n_banks: int, d_in: int, d_out: int, *, bias: bool, granularity: Granularity = Granularity.per_channel,
        backend: KernelBackend = KernelBackend.auto,
    ):
        super().__init__()
        # same size attributes as PerTokenLinear: model code (MoE dispatch, UG-Sep bank ranges) reads them
        self.n_banks, self.d_in, self.d_out = n_banks, d_in, d_out
        self.granularity = Granularity(granularity)
        # fixed when the layer is built (W8A16Config.backend); `auto` follows the input's device
        self.backend = KernelBackend(backend)
        self.register_buffer("q_TOI", torch.zeros(n_banks, d_out, d_in, dtype=torch.int8))
        s_shape = (n_banks, d_out) if self.granularity is Granularity.per_channel else (n_banks, -(-d_in // GROUP_SIZE), d_out)
        self.register_buffer("scale", torch.ones(s_shape, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(n_banks, d_out) if bias else None)

    @classmethod
    def from_float(
        cls, w_TIO: torch.Tensor, b_TO: Optional[torch.Tensor], granularity: Granularity, backend: KernelBackend = KernelBackend.auto
    ) -> "W8A16PerTokenLinear":
        T, I, O = w_TIO.shape
        mod = cls(T, I, O, bias=b_TO is not None, granularity=granularity, backend=backend)
        q_TIO, s = quantize_w8a16(w_TIO, granularity)
        mod.q_TOI.copy_(q_TIO.transpose(1, 2))
        mod.scale.copy_(s)
        if b_TO is not None:
            mod.bias = b_TO.detach().float().clone()
        return mod.to(w_TIO.device)

    def q_TIO(self) -> torch.Tensor:
        return self.q_TOI.transpose(1, 2)

    def forward(self, x_BTI: torch.Tensor) -> torch.Tensor:
        return pertoken_linear_w8a16(x_BTI, self.q_TIO(), self.scale, self.bias, backend=self.backend)

    def forward_banks(self, x_BPI: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Banks [lo, hi) only (UG-Sep's user / candidate bank ranges, recmix.models.ugsep_ops)."""
        bias = None if self.bias is None else self.bias[lo:hi]
        return pertoken_linear_w8a16(x_BPI, self.q_TOI[lo:hi].transpose(1, 2), self.scale[lo:hi], bias, backend=self.backend)

    def extra_repr(self) -> str:
        return f"banks={self.n_banks}, I={self.d_in}, O={self.d_out}, {self.granularity.value}, bias={self.bias is not None}, backend={self.backend.value}"


class W8A16Linear(W8A16PerTokenLinear):
    """An `nn.Linear` (tokenizer / heads targets) as one weight bank: x_NI -> (N, 1, I) -> y_NO."""

    @classmethod
    def from_linear(cls, lin: nn.Linear, granularity: Granularity, backend: KernelBackend = KernelBackend.auto) -> "W8A16Linear":
        b_TO = None if lin.bias is None else lin.bias.detach().unsqueeze(0)
        return cls.from_float(lin.weight.detach().t().unsqueeze(0), b_TO, granularity, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = super().forward(x.reshape(-1, 1, x.shape[-1]))
        return y.reshape(*lead, self.d_out)


def _part(name: str) -> Optional[Target]:
    parts = name.lower().split(".")
    if any("router" in p for p in parts):
        return None
    if any("tokenizer" in p for p in parts):
        return Target.tokenizer
    if any(p.startswith("head") for p in parts):
        return Target.heads
    return Target.per_token_ffn


def _plan(model: nn.Module, cfg: W8A16Config, classes: tuple[type, ...]) -> list[tuple[str, str]]:
    """[(qualified name, kind)] with kind 'pertoken' or 'linear', for every module to swap."""
    plan = []
    for name, mod in model.named_modules():
        part = _part(name)
        if part is None or part not in cfg.targets:
            continue
        if isinstance(mod, classes):
            plan.append((name, "pertoken"))
        elif type(mod) is nn.Linear and part is not Target.per_token_ffn:
            plan.append((name, "linear"))
    return plan


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def quantize_model(
    model: nn.Module,
    targets: Iterable[Target | str] = (Target.per_token_ffn,),
    granularity: Granularity | str = Granularity.per_channel,
    *,
    backend: KernelBackend | str = KernelBackend.auto,
    config: Optional[W8A16Config] = None,
    classes: tuple[type, ...] = (PerTokenLinear,),
) -> nn.Module:
    """Swap the targeted layers in place for W8A16 ones and return the model (in eval mode).

    `config` replaces targets / granularity / backend; `classes` are the module types that count as per-token linears."""
    cfg = config or W8A16Config(granularity=granularity, targets=list(targets), backend=backend)
    _check_backend(model, cfg.backend)
    plan = _plan(model, cfg, classes)
    if not plan:
        raise ValueError(f"quantize_model: no layer to quantize for targets {[t.value for t in cfg.targets]} in {type(model).__name__}")
    for name, kind in plan:
        mod = model.get_submodule(name)
        if kind == "pertoken":
            new = W8A16PerTokenLinear.from_float(mod.weight.detach(), getattr(mod, "bias", None), cfg.granularity, cfg.backend)
        else:
            new = W8A16Linear.from_linear(mod, cfg.granularity, cfg.backend)
        if name:
            _swap(model, name, new)
        else:  # the model is itself one layer: nothing to swap into, the new layer is the model
            model = new
    model._recmix_w8a16 = {"config": cfg.model_dump(mode="json"), "modules": plan}
    return model.eval()


def _check_backend(model: nn.Module, backend: KernelBackend) -> None:
    """Fail at build time, not on the first forward, when the configured backend cannot run here."""
    p = next(model.parameters(), None)
    resolve_backend(backend, p.device if p is not None else "cpu")


def export_quantized(model: nn.Module, uri: str, storage_cfg: Optional[StorageConfig] = None) -> None:
    """Write a quantized model's state and plan to a local path or s3:// URI (loadable with weights_only)."""
    meta = getattr(model, "_recmix_w8a16", None)
    if meta is None:
        raise ValueError(f"export_quantized: {type(model).__name__} was not quantized with quantize_model")
    payload = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": meta["config"],
        "modules": [list(p) for p in meta["modules"]],
        "state_dict": model.state_dict(),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    fs, path = storage.resolve(uri, storage_cfg)
    storage.write_bytes_atomic(fs, path, buf.getvalue())


def load_quantized(
    model: nn.Module, uri: str, storage_cfg: Optional[StorageConfig] = None, *, backend: Optional[KernelBackend | str] = None
) -> nn.Module:
    """Rebuild the quantized layers on a freshly built (float) model of the same architecture, then load.

    `backend` replaces the exported config's backend (a property of the serving machine, not of the weights)."""
    fs, path = storage.resolve(uri, storage_cfg)
    payload = torch.load(io.BytesIO(storage.read_bytes(fs, path)), weights_only=True, map_location="cpu")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != FORMAT_VERSION:
        raise RecmixError(f"{uri}: not a {FORMAT} v{FORMAT_VERSION} export")
    cfg = W8A16Config(**payload["config"])
    if backend is not None:
        cfg = cfg.model_copy(update={"backend": KernelBackend(backend)})
    _check_backend(model, cfg.backend)
    for name, kind in payload["modules"]:
        try:
            mod = model.get_submodule(name)
        except AttributeError:
            raise RecmixError(f"{uri}: module '{name}' is not in {type(model).__name__}") from None
        w_TIO = mod.weight.detach().t().unsqueeze(0) if kind == "linear" else mod.weight.detach()
        T, I, O = w_TIO.shape
        cls = W8A16Linear if kind == "linear" else W8A16PerTokenLinear
        _swap(model, name, cls(T, I, O, bias=getattr(mod, "bias", None) is not None, granularity=cfg.granularity, backend=cfg.backend))
    model.load_state_dict(payload["state_dict"], strict=True)
    model._recmix_w8a16 = {"config": cfg.model_dump(mode="json"), "modules": [tuple(p) for p in payload["modules"]]}
    return model.eval()
