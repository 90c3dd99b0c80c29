"""The built-in dataset: scikit-learn's 1,797 real 8x8 handwritten digits, written in any of the
input formats (so the demo, the tests and the benchmarks run every reader on real images).

Pixel values are 0..16 in every format (use scale 1/16); `upsample` repeats each pixel to make
larger images (PNG formats only), for exercising resizing.
"""

from __future__ import annotations

import io
import tarfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kdpipe import storage
from kdpipe.data import images
from kdpipe.errors import ConfigError, InputError

DATASET_RECORD = "_dataset.json"
LAYOUTS = ("parquet", "parquet-png", "webdataset", "imagefolder")


def _key(i: int) -> str:
    return f"digits-{i:04d}"


def _png(image: np.ndarray, upsample: int) -> bytes:
    img = np.repeat(np.repeat(image.astype(np.uint8), upsample, axis=0), upsample, axis=1)
    return images.encode_png(img)


def parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_split(fs, root: str, name: str, idx: np.ndarray, pixels: np.ndarray, targets: np.ndarray,
                layout: str, parts: int, upsample: int = 1, labelled: bool = True) -> None:
    """Write digits `idx` (pixels [N, 8, 8] 0..16, targets [N]) under `root` as `parts` shards."""
    if layout == "imagefolder":
        files = {storage.join(root, str(int(targets[i])), f"{_key(i)}.png"): _png(pixels[i], upsample) for i in idx}
        if storage.is_local(fs):
            for path, data in files.items():
                storage.write_bytes(fs, path, data)
        else:
            fs.pipe(files)  # one PUT per object (each all-or-nothing), sent concurrently
        return
    for s, chunk in enumerate(np.array_split(idx, parts)):
        path = storage.join(root, f"{name}-{s:05d}")
        if layout == "webdataset":
            members = []
            for i in chunk:
                members.append((f"{_key(i)}.png", _png(pixels[i], upsample)))
                if labelled:
                    members.append((f"{_key(i)}.cls", str(int(targets[i])).encode()))
            storage.write_bytes(fs, path + ".tar", _tar_bytes(members))
            continue
        if layout == "parquet":
            flat = pixels[chunk].reshape(len(chunk), -1).astype(np.uint8)
            image = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.uint8()), flat.shape[1])
        else:
            image = pa.array([_png(pixels[i], upsample) for i in chunk], pa.binary())
        columns = {"sample_key": pa.array([_key(i) for i in chunk]), "image": image}
        if labelled:
            columns["label"] = pa.array(targets[chunk].astype(np.int64))
        storage.write_bytes(fs, path + ".parquet", parquet_bytes(pa.table(columns)))


def ensure_digits(train_uri: str, holdout_uri: str, storage_options: dict[str, Any] | None,
                  num_shards: int, holdout_fraction: float, seed: int, layout: str = "parquet",
                  upsample: int = 1) -> bool:
    """Write the digits (train split in `num_shards` files, held-out in one) unless already
    there. Returns True when it wrote them."""
    from sklearn.datasets import load_digits

    if layout not in LAYOUTS:
        raise ConfigError(f"digits layout {layout!r}: use one of {LAYOUTS}")
    settings = {"name": "digits", "num_shards": num_shards, "holdout_fraction": holdout_fraction,
                "seed": seed}
    if layout != "parquet" or upsample != 1:
        settings.update(layout=layout, upsample=upsample)
    fs, train_root = storage.filesystem(train_uri, storage_options)
    _, holdout_root = storage.filesystem(holdout_uri, storage_options)
    records = [storage.join(train_root, DATASET_RECORD), storage.join(holdout_root, DATASET_RECORD)]
    if all(fs.exists(r) for r in records):
        for r in records:
            if storage.read_json(fs, r).get("settings") != settings:
                raise InputError(
                    f"{r} was written with other settings than {settings}: "
                    "use another workdir or data path, or delete the old data"
                )
        return False
    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.target))
    n_holdout = int(round(len(order) * holdout_fraction))
    holdout, train = np.sort(order[:n_holdout]), np.sort(order[n_holdout:])
    for name, root, idx, parts in (("train", train_root, train, num_shards), ("holdout", holdout_root, holdout, 1)):
        write_split(fs, root, name, idx, digits.images, digits.target, layout, parts, upsample)
        storage.write_json(fs, storage.join(root, DATASET_RECORD),
                           {"settings": settings, "rows": int(len(idx)), "shards": parts})
    return True


def ensure_builtin(data) -> bool:
    """ensure_digits() for a config.DataConfig with data.builtin set, in its data.format."""
    return ensure_digits(data.train, data.holdout, data.storage_options, data.num_shards, data.holdout_fraction,
                         data.split_seed, layout=data.format)
