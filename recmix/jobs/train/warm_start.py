"""`init_from`: load the weights a run starts from (recmix.models.warm_start does the mapping)."""

from __future__ import annotations

import io

import torch
from torch import nn

from recmix.models import artifact as fmt
from recmix.models.warm_start import warm_state
from recmix.platform import storage
from recmix.platform.errors import RecmixError
from recmix.platform.specs.data import StorageConfig


def locate_source(uri: str, storage_cfg: StorageConfig):
    """(filesystem, path) of the weights `uri` names: a run's output folder (its `model.pt`, the best epoch's
    weights) or a model artifact (`dense.pt` of the version LATEST names, or of the version folder given).
    Reads no weights: the driver calls it before Ray starts, the workers load."""
    fs, root = storage.resolve(uri, storage_cfg)
    path = storage.join(root, "model.pt")
    try:
        found = fs.get_file_info(path).type.name == "File"
    except OSError as e:   # an unreachable S3 endpoint: one line, as a missing file is
        raise RecmixError(f"init_from: {uri}: {storage.describe(e, storage_cfg)}") from None
    if not found:
        version = fmt.resolve_version(uri, storage_cfg)
        vfs, vroot = storage.resolve(version, storage_cfg)
        fs, path = vfs, storage.join(vroot, fmt.read_doc(version, storage_cfg)["dense"])
    return fs, path


def read_source(uri: str, storage_cfg: StorageConfig) -> dict[str, torch.Tensor]:
    """The state_dict `uri` names (`locate_source`)."""
    fs, path = locate_source(uri, storage_cfg)
    try:
        state = torch.load(io.BytesIO(storage.read_bytes(fs, path)), weights_only=True, map_location="cpu")
    except RecmixError:
        raise
    except Exception as e:   # a corrupt or foreign file: weights_only refuses anything but tensors
        raise RecmixError(f"init_from: {path} is not a state_dict ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict):
        raise RecmixError(f"init_from: {path} holds a {type(state).__name__}, not a state_dict")
    return state


def apply(model: nn.Module, uri: str, storage_cfg: StorageConfig) -> str:
    """Load the source into `model`; returns the line the run logs."""
    try:
        state, split = warm_state(model, read_source(uri, storage_cfg))
    except RecmixError:
        raise
    except ValueError as e:
        raise RecmixError(f"init_from: {uri}: {e}") from None
    model.load_state_dict(state)
    how = f"; {len(split)} S-P MoE layer(s) split from the dense pSwiGLU" if split else ""
    return f"[train] initial weights from {uri}{how}"
