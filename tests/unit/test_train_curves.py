"""The run report's curves.png: a valid PNG whose panels show each curve where its values put it."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from recmix.jobs.train import curves


def _decode(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(png):
        n, kind = struct.unpack(">I4s", png[pos:pos + 8])
        data = png[pos + 8:pos + 8 + n]
        assert zlib.crc32(kind + data) & 0xFFFFFFFF == struct.unpack(">I", png[pos + 8 + n:pos + 12 + n])[0]
        if kind == b"IHDR":
            size = struct.unpack(">II", data[:8])
        elif kind == b"IDAT":
            idat += data
        pos += 12 + n
    w, h = size
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, 3)


def _ink_rows(img: np.ndarray, color) -> np.ndarray:
    return np.nonzero((img == np.array(color, np.uint8)).all(-1).any(1))[0]


def test_curves_png_decodes_and_places_the_curves():
    hist = [{"train_loss": 0.70, "valid_auc": 0.60}, {"train_loss": 0.60, "valid_auc": 0.70},
            {"train_loss": 0.50, "valid_auc": 0.65}]
    img = _decode(curves.png_bytes(curves.render(hist, best_epoch=2)))
    assert img.shape == (curves.H, 2 * curves.W, 3)
    loss_panel, auc_panel = img[:, :curves.W], img[:, curves.W:]
    assert _ink_rows(loss_panel, curves.COLORS["loss"]).size and not _ink_rows(loss_panel, curves.COLORS["auc"]).size
    assert _ink_rows(auc_panel, curves.COLORS["auc"]).size
    # the best epoch is marked, in both panels
    assert _ink_rows(loss_panel, curves.COLORS["best"]).size and _ink_rows(auc_panel, curves.COLORS["best"]).size
    # a falling loss: its first point is higher on the canvas (smaller row) than its last
    cols = np.nonzero((loss_panel == np.array(curves.COLORS["loss"], np.uint8)).all(-1))
    left = cols[0][cols[1] < cols[1].min() + 4].mean()
    right = cols[0][cols[1] > cols[1].max() - 4].mean()
    assert left < right


def test_curves_survive_one_epoch_and_missing_values():
    img = _decode(curves.png_bytes(curves.render([{"train_loss": float("nan"), "valid_auc": 0.5}], None)))
    assert img.shape == (curves.H, 2 * curves.W, 3)
    _decode(curves.png_bytes(curves.render([], None)))
