"""Publish a run's model artifact (layout in recmix.models.artifact): version folder first, LATEST last."""

from __future__ import annotations

import datetime as _dt
import io
import json
import platform
import uuid
from importlib import metadata

import torch

import recmix
from recmix.models import artifact as fmt
from recmix.platform import storage
from recmix.platform.specs.train import TrainSpec


def new_version() -> str:
    return f"v{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def packages() -> dict:
    out = {"recmix": recmix.__version__, "python": platform.python_version()}
    for name in ("torch", "ray", "pyarrow", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def root_uri(spec: TrainSpec) -> str:
    return storage.join(spec.output.rstrip("/"), "artifact")


def version_uri(spec: TrainSpec, version: str) -> str:
    return storage.join(root_uri(spec), version)


def publish(spec: TrainSpec, version: str, schema, best_state: dict, metrics: dict, embeddings: str | None) -> str:
    """Write `<output>/artifact/<version>/` (dense.pt, artifact.json) and then LATEST; returns the version URI.
    `embeddings`: the folder name, inside the version folder, of a serving snapshot already written there."""
    uri = version_uri(spec, version)
    fs, root = storage.resolve(uri, spec.storage)
    buf = io.BytesIO()
    torch.save(best_state, buf)
    storage.write_bytes_atomic(fs, storage.join(root, fmt.DENSE), buf.getvalue())
    doc = {"format": fmt.FORMAT, "version": version,
           "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           # the fields the spec set (model_resolved holds every value; model_config pins later-filled defaults)
           "model": spec.model.model_dump(mode="json", exclude_unset=True),
           "model_resolved": spec.model.model_dump(mode="json"), "features": schema.model_dump(mode="json"),
           "hash_contract": "splitmix64 bucketing of raw ids for hashed tables (recmix.models.embedding)",
           "dense": fmt.DENSE, "embeddings": embeddings, "metrics": metrics, "packages": packages(),
           "run": {"name": spec.name, "dataset": spec.dataset.uri, "seed": spec.seed}}
    storage.write_bytes_atomic(fs, storage.join(root, fmt.DOC), json.dumps(doc, indent=1, default=float).encode())
    if spec.quantize is not None:
        _add_w8a16(spec, uri, fs, root, doc)
    lfs, lroot = storage.resolve(root_uri(spec), spec.storage)
    storage.write_bytes_atomic(lfs, storage.join(lroot, fmt.LATEST), (version + "\n").encode())
    return uri


def _add_w8a16(spec: TrainSpec, uri: str, fs, root: str, doc: dict) -> None:
    """Quantize the published float model and add `w8a16.pt` to the version folder (before LATEST names it).
    The weights do not depend on the kernel: they are built with the reference backend, which runs anywhere;
    the loader picks the kernel."""
    from recmix.models.quantize import export_quantized, quantize_model
    from recmix.platform.specs.w8a16 import KernelBackend

    model = fmt.load_artifact(uri, spec.storage)
    quantize_model(model, config=spec.quantize.model_copy(update={"backend": KernelBackend.reference}))
    export_quantized(model, storage.join(uri, fmt.W8A16), spec.storage)
    doc["w8a16"] = fmt.W8A16
    doc["w8a16_config"] = spec.quantize.model_dump(mode="json")
    storage.write_bytes_atomic(fs, storage.join(root, fmt.DOC), json.dumps(doc, indent=1, default=float).encode())
