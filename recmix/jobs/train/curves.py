"""`curves.png`: the run report's loss and valid-AUC curves per epoch, drawn without a plotting library.

Two panels side by side (train loss, valid AUC), each with its title, the y range printed at the top and
bottom of its axis and the epoch numbers under the x axis; the best epoch is marked. The PNG is written
with zlib only (no matplotlib or Pillow among recmix's dependencies): an RGB canvas, lines by sampled
interpolation, text in a 3x5 pixel font scaled 2x.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

W, H = 360, 220                    # one panel
PAD_L, PAD_R, PAD_T, PAD_B = 56, 12, 28, 28
SCALE = 2
COLORS = {"axis": (60, 60, 60), "loss": (31, 119, 180), "auc": (214, 39, 40), "best": (44, 160, 44)}

# 3x5 glyphs, rows top to bottom, '#' = ink
_FONT = {
    "0": ["###", "#.#", "#.#", "#.#", "###"], "1": [".#.", "##.", ".#.", ".#.", "###"],
    "2": ["###", "..#", "###", "#..", "###"], "3": ["###", "..#", "###", "..#", "###"],
    "4": ["#.#", "#.#", "###", "..#", "..#"], "5": ["###", "#..", "###", "..#", "###"],
    "6": ["###", "#..", "###", "#.#", "###"], "7": ["###", "..#", "..#", "..#", "..#"],
    "8": ["###", "#.#", "###", "#.#", "###"], "9": ["###", "#.#", "###", "..#", "###"],
    ".": ["...", "...", "...", "...", ".#."], "-": ["...", "...", "###", "...", "..."],
    " ": ["...", "...", "...", "...", "..."], "a": ["...", "###", "#.#", "###", "#.#"],
    "b": ["#..", "#..", "###", "#.#", "###"], "c": ["...", "###", "#..", "#..", "###"],
    "d": ["..#", "..#", "###", "#.#", "###"], "e": ["###", "#..", "###", "#..", "###"],
    "h": ["#..", "#..", "###", "#.#", "#.#"], "i": [".#.", "...", ".#.", ".#.", ".#."],
    "l": ["#..", "#..", "#..", "#..", "###"], "n": ["...", "##.", "#.#", "#.#", "#.#"],
    "o": ["...", "###", "#.#", "#.#", "###"], "p": ["###", "#.#", "###", "#..", "#.."],
    "r": ["...", "###", "#..", "#..", "#.."], "s": ["###", "#..", "###", "..#", "###"],
    "t": [".#.", "###", ".#.", ".#.", ".##"], "u": ["...", "#.#", "#.#", "#.#", "###"],
    "v": ["...", "#.#", "#.#", "#.#", ".#."], "y": ["#.#", "#.#", "###", "..#", "###"],
    "k": ["#..", "#.#", "##.", "#.#", "#.#"], "g": ["###", "#..", "#.#", "#.#", "###"],
}


def _text(img: np.ndarray, x: int, y: int, s: str, color) -> None:
    for ch in s.lower():
        glyph = _FONT.get(ch, _FONT[" "])
        for r, row in enumerate(glyph):
            for c, v in enumerate(row):
                if v == "#":
                    img[y + r * SCALE:y + (r + 1) * SCALE, x + c * SCALE:x + (c + 1) * SCALE] = color
        x += 4 * SCALE


def _line(img: np.ndarray, p0, p1, color) -> None:
    n = int(max(abs(p1[0] - p0[0]), abs(p1[1] - p0[1]))) + 1
    xs = np.rint(np.linspace(p0[0], p1[0], n)).astype(int)
    ys = np.rint(np.linspace(p0[1], p1[1], n)).astype(int)
    for dx in (0, 1):          # 2 px wide
        img[ys, np.clip(xs + dx, 0, img.shape[1] - 1)] = color


def _panel(values: list[float], title: str, color, best: int | None) -> np.ndarray:
    img = np.full((H, W, 3), 255, np.uint8)
    x0, x1, y0, y1 = PAD_L, W - PAD_R, PAD_T, H - PAD_B
    _line(img, (x0, y0), (x0, y1), COLORS["axis"])
    _line(img, (x0, y1), (x1, y1), COLORS["axis"])
    _text(img, x0, 6, title, COLORS["axis"])
    v = np.asarray(values, np.float64)
    ok = np.isfinite(v)
    if not ok.any():
        return img
    lo, hi = float(v[ok].min()), float(v[ok].max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    _text(img, 4, y0, f"{hi:.4f}", COLORS["axis"])
    _text(img, 4, y1 - 10, f"{lo:.4f}", COLORS["axis"])
    n = len(v)
    px = [x0 + 8 + (x1 - x0 - 16) * (i / max(n - 1, 1)) for i in range(n)]
    py = [y1 - 4 - (y1 - y0 - 8) * ((val - lo) / (hi - lo)) if np.isfinite(val) else None for val in v]
    for i in range(n):
        _text(img, int(px[i]) - 3, y1 + 8, str(i + 1), COLORS["axis"])
        if py[i] is None:
            continue
        if i and py[i - 1] is not None:
            _line(img, (px[i - 1], py[i - 1]), (px[i], py[i]), color)
        mark = COLORS["best"] if best == i + 1 else color
        yy, xx = int(py[i]), int(px[i])
        img[max(yy - 3, 0):yy + 4, max(xx - 3, 0):xx + 4] = mark
    _text(img, 4, y1 + 8, "epoch", COLORS["axis"])
    return img


def render(history: list[dict], best_epoch: int | None) -> np.ndarray:
    """(H, 2W, 3) uint8: train loss and valid AUC per epoch of `history` (the train report's records)."""
    loss = [float(h.get("train_loss", float("nan"))) for h in history]
    auc = [float(h.get("valid_auc", float("nan"))) for h in history]
    return np.concatenate([_panel(loss, "train loss", COLORS["loss"], best_epoch),
                           _panel(auc, "valid auc", COLORS["auc"], best_epoch)], axis=1)


def png_bytes(img: np.ndarray) -> bytes:
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, img.shape
    h, w, _ = img.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
