"""Images: decoding, the geometric part of preprocessing (done once per view in read tasks) and
normalisation (done by the consumer, on its device).

Preprocessing is split in two so that teachers can share work and transfers stay small:
  * geometry (channels, resize, centre crop) runs in the read task on uint8 pixels; teachers
    that ask for the same geometry share one uint8 column (a "view"), and every view is cut
    from one decode of each image;
  * normalisation (x * scale - mean) / std runs inside the teacher actor or the student loop,
    so what travels through Ray's object store is uint8, a quarter of float32.

Images inside this module are numpy uint8 arrays [H, W, C]. Views are [N, C, H, W].
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "pgm", "tif", "tiff", "gif")


@dataclass(frozen=True)
class Preprocess:
    """What one consumer (a teacher or the student) feeds its model: [C, H, W] float32.

    resize: None keeps the decoded size; an int resizes the shorter side to it (aspect kept,
    like torchvision's Resize(int)); [H, W] resizes to exactly that. Then a centre crop to
    image_shape[1:], then x = (pixels * scale - mean) / std per channel."""

    image_shape: tuple[int, int, int]
    resize: int | tuple[int, int] | None = None
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def geometry(self) -> dict[str, Any]:
        resize = list(self.resize) if isinstance(self.resize, (tuple, list)) else self.resize
        return {"channels": int(self.image_shape[0]), "resize": resize, "size": [int(s) for s in self.image_shape[1:]]}

    def view(self) -> str:
        """The column name of this geometry's uint8 view; equal geometries share it."""
        body = json.dumps(self.geometry(), sort_keys=True).encode()
        return "x_" + hashlib.sha256(body).hexdigest()[:10]

    def spec(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    def normalise(self, x):
        """uint8 [N, C, H, W] -> float32 model input; a torch tensor (any device) or a numpy array."""
        if isinstance(x, np.ndarray):
            x = x.astype(np.float32) * np.float32(self.scale)
            if self.mean:
                x = x - np.asarray(self.mean, np.float32).reshape(1, -1, 1, 1)
            if self.std:
                x = x / np.asarray(self.std, np.float32).reshape(1, -1, 1, 1)
            return x
        import torch

        x = x.float() * self.scale
        if self.mean:
            x = x - torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        if self.std:
            x = x / torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return x


def make_preprocess(image_shape: list[int], resize: Any, scale: float, mean: list[float],
                    std: list[float]) -> Preprocess:
    if isinstance(resize, list):
        resize = tuple(int(v) for v in resize)
    return Preprocess(tuple(int(v) for v in image_shape), resize, float(scale),
                      tuple(float(v) for v in mean), tuple(float(v) for v in std))


class DecodeError(ValueError):
    """Bytes that are not a readable image (the message says why)."""


def decode(data: bytes) -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, ...) -> uint8 [H, W, C] with C in {1, 3}."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now: truncated files fail here, not later
            if img.mode in ("1", "LA", "I", "I;16", "F"):
                img = img.convert("L")
            elif img.mode not in ("L", "RGB"):
                img = img.convert("RGB")  # RGBA, P, CMYK, YCbCr...
            arr = np.asarray(img, dtype=np.uint8)
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError...
        raise DecodeError(f"not a readable image ({type(e).__name__}: {e})") from None
    return arr[..., None] if arr.ndim == 2 else arr


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, C] -> PNG bytes (for tests, fixtures and the built-in data)."""
    from PIL import Image

    arr = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _channels(img: np.ndarray, channels: int) -> np.ndarray:
    c = img.shape[-1]
    if c == channels:
        return img
    if channels == 1 and c >= 3:  # ITU-R 601-2 luma, what PIL's convert("L") uses
        luma = img[..., 0] * 0.299 + img[..., 1] * 0.587 + img[..., 2] * 0.114
        return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]
    if channels == 3 and c == 1:
        return np.repeat(img, 3, axis=-1)
    raise ValueError(f"cannot convert a {c}-channel image to {channels} channels")


def _resize(img: np.ndarray, resize: Any) -> np.ndarray:
    from PIL import Image

    h, w = img.shape[:2]
    if isinstance(resize, (list, tuple)):
        th, tw = int(resize[0]), int(resize[1])
    else:
        short = int(resize)
        th, tw = (short, max(1, round(w * short / h))) if h <= w else (max(1, round(h * short / w)), short)
    if (th, tw) == (h, w):
        return img
    planes = [np.asarray(Image.fromarray(img[..., c]).resize((tw, th), Image.BILINEAR)) for c in range(img.shape[-1])]
    return np.stack(planes, axis=-1)


def _crop(img: np.ndarray, size: list[int]) -> np.ndarray:
    """Centre crop of [..., H, W, C] to `size` [H, W]."""
    h, w = img.shape[-3:-1]
    th, tw = size
    if h < th or w < tw:
        raise ValueError(f"image is {h}x{w}, smaller than the model input {th}x{tw}: set a `resize` in the preprocessing")
    top, left = (h - th) // 2, (w - tw) // 2
    return img[..., top:top + th, left:left + tw, :]


def apply_geometry(images: list[np.ndarray] | np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    """Images (uint8 [H, W, C] each, sizes may differ) -> one view, uint8 [N, C, H, W]."""
    size, channels, resize = geometry["size"], geometry["channels"], geometry["resize"]
    if isinstance(images, np.ndarray) and images.ndim == 4 and resize is None:
        # Same-size pixels (e.g. pixel-list Parquet): vectorised, no per-image work.
        return np.ascontiguousarray(_crop(_channels(images, channels), size).transpose(0, 3, 1, 2))
    out = np.empty((len(images), channels, size[0], size[1]), dtype=np.uint8)
    for i, img in enumerate(images):
        img = _channels(img, channels)
        if resize is not None:
            img = _resize(img, resize)
        out[i] = _crop(img, size).transpose(2, 0, 1)
    return out
