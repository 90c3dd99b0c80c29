"""Images: decoding, the geometric part of preprocessing (done once per view in read tasks) and
normalisation (done by the consumer, on its device).

Preprocessing is split in two so that teachers can share work and transfers stay small:
  * geometry (channels, resize, centre crop) runs in the read task on uint8 pixels; teachers
    that ask for the same geometry share one uint8 pixel column, and every column is cut
    from one decode of each image;
  * normalisation (x * scale - mean) / std runs inside the teacher actor or the student loop,
    so what travels through Ray's object store is uint8, a quarter of float32.

Images inside this module are numpy uint8 arrays [H, W, C]; pixel columns are [N, C, H, W].
A "view" is only ever an augmented view (labels.views): a random resized crop of a sample.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from kdpipe.errors import InputError

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

    def pixels_column(self) -> str:
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


class DecodeError(InputError):
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
    return _encode(image, "PNG")


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """uint8 [H, W] or [H, W, C] -> JPEG bytes (ImageNet's format: the GPU benchmarks' inputs)."""
    return _encode(image, "JPEG", quality=quality)


def _encode(image: np.ndarray, image_format: str, **params: Any) -> bytes:
    from PIL import Image

    arr = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buf, format=image_format, **params)
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
    raise InputError(f"cannot convert a {c}-channel image to {channels} channels")


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
        raise InputError(f"image is {h}x{w}, smaller than the model input {th}x{tw}: set a `resize` in the preprocessing")
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


# --- Augmented views: stored at generation, replayed by the student ----------------------------
#
# A view is a random resized crop with an optional horizontal flip, described by five numbers
# relative to the decoded image: (top, left, height, width) as fractions of its height/width and
# flip (0 or 1). The numbers are drawn from a generator seeded by (seed, sample key, view index),
# rounded to float32, stored with the teacher's labels, and turned into pixels by `augmented`
# alone, so the student that reads them cuts exactly the image the teacher labelled.
# (0, 0, 0, 0, 0) stands for the plain view (the preprocessing's resize and centre crop).

AUG_FIELDS = ("top", "left", "height", "width", "flip")
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # aspect-ratio range of the crops, as torchvision's RandomResizedCrop


def augment_params(key: str, views: int, seed: int, crop_scale: tuple[float, float], flip: bool) -> np.ndarray:
    """float32 [views, 5]: the crop boxes and flips of one sample's augmented views."""
    words = np.frombuffer(hashlib.sha256(key.encode()).digest()[:16], dtype="<u4").tolist()
    rng = np.random.default_rng([int(seed), *words])
    out = np.zeros((views, 5), dtype=np.float32)
    for v in range(views):
        area = rng.uniform(crop_scale[0], crop_scale[1])
        ratio = np.exp(rng.uniform(np.log(RATIO[0]), np.log(RATIO[1])))
        h, w = min(1.0, np.sqrt(area / ratio)), min(1.0, np.sqrt(area * ratio))
        out[v] = (rng.uniform(0, 1 - h), rng.uniform(0, 1 - w), h, w, float(flip and rng.random() < 0.5))
    return out


def _box(params: np.ndarray, h: int, w: int) -> tuple[int, int, int, int]:
    """Pixel box (top, left, height, width) of view params on an h x w image, inside it."""
    ch = min(h, max(1, int(round(float(params[2]) * h))))
    cw = min(w, max(1, int(round(float(params[3]) * w))))
    top = min(h - ch, max(0, int(round(float(params[0]) * h))))
    left = min(w - cw, max(0, int(round(float(params[1]) * w))))
    return top, left, ch, cw


def augmented(images: list[np.ndarray] | np.ndarray, params: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    """The augmented views of images (uint8 [H, W, C] each): params float32 [N, V, 5] ->
    uint8 [N, V, C, H, W] in `geometry`'s channels and size: crop the box from the decoded
    image, resize it to the size (bilinear), flip."""
    from PIL import Image

    params = np.asarray(params, dtype=np.float32)
    n, v = params.shape[:2]
    size, channels = geometry["size"], geometry["channels"]
    out = np.empty((n, v, channels, size[0], size[1]), dtype=np.uint8)
    for i in range(n):
        img = _channels(np.asarray(images[i]), channels)
        for j in range(v):
            top, left, ch, cw = _box(params[i, j], *img.shape[:2])
            crop = img[top:top + ch, left:left + cw]
            planes = [np.asarray(Image.fromarray(np.ascontiguousarray(crop[..., c])).resize(
                (size[1], size[0]), Image.BILINEAR)) for c in range(channels)]
            view = np.stack(planes, axis=0)
            out[i, j] = view[:, :, ::-1] if params[i, j, 4] >= 0.5 else view
    return out
