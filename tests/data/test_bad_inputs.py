"""Bad inputs the other test files do not already cover, each refused with an error that names
the file or key, or made harmless: a corrupt Parquet input, an empty dataset in every format,
sample keys and file names that try path traversal. (README: "What kdpipe does with bad input".)"""

from __future__ import annotations

import io
import os
import re
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdpipe import storage
from kdpipe.config import DataConfig
from kdpipe.data import images, inputs, readers
from kdpipe.labels import cache, codec

EVIL = ["../../etc/passwd", "/abs/path", "a/../../b", "..", ".hidden", "x%2F..%2Fy", "new\nline"]


def test_corrupt_parquet_input_names_the_file(tmp_path):
    (tmp_path / "train").mkdir()
    good = pa.table({"sample_key": ["a"], "image": [images.encode_png(np.zeros((8, 8), np.uint8))], "label": [1]})
    pq.write_table(good, tmp_path / "train" / "good.parquet")
    (tmp_path / "train" / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    data = DataConfig(train=str(tmp_path / "train"))
    source = inputs.source_spec(data, check_holdout=False)
    with pytest.raises(ValueError, match=r"bad\.parquet' is not a readable Parquet file.*re-create or remove it"):
        for shard in inputs.list_shards(data.train, source):
            readers.read_samples(shard, source)


@pytest.mark.parametrize("fmt,what", [("parquet", "no .parquet files"), ("webdataset", "no .tar"),
                                      ("imagefolder", "no images in class folders")])
def test_empty_dataset_is_named(tmp_path, fmt, what):
    (tmp_path / "train" / "cls").mkdir(parents=True)
    (tmp_path / "train" / "notes.txt").write_text("not data")
    data = DataConfig(train=str(tmp_path / "train"), format=fmt)
    with pytest.raises(ValueError, match=rf"input dataset '.*train' holds {re.escape(what)}"):
        inputs.list_shards(data.train, inputs.source_spec(data, check_holdout=False))


def test_missing_dataset_is_named(tmp_path):
    data = DataConfig(train=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"input dataset '.*nowhere' does not exist"):
        inputs.list_shards(data.train, inputs.source_spec(data, check_holdout=False))


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_path_traversal_keys_never_become_paths(tmp_path, fmt):
    """Keys reach the disk only as label rows (Parquet) or escaped tar member names (WebDataset):
    a unit writes exactly its part file and its record, inside its own directory."""
    directory = tmp_path / "cache" / "unit"
    fs, path = storage.filesystem(str(directory))
    logits = np.random.default_rng(0).normal(size=(len(EVIL), 10)).astype(np.float32)
    data = codec.encode_unit(EVIL, logits, "full", 10, 2.0, "float16", fmt, 1024)
    record = cache.write_unit(fs, path, {"shard_id": "s-0", "uri": "x", "token": {}}, data, fmt, EVIL, {})
    written = sorted(os.path.relpath(os.path.join(d, f), tmp_path) for d, _, fs_ in os.walk(tmp_path) for f in fs_)
    assert written == sorted([f"cache/unit/{record['part']}", "cache/unit/_units/s-0.json"])
    rows = codec.decode_unit(data, "full", fmt)
    assert sorted(rows["keys"]) == sorted(EVIL)  # the keys themselves survive, exactly
    if fmt == "webdataset":
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            names = tar.getnames()
            assert all("/" not in n and not n.startswith(".") and "\n" not in n for n in names)
            out = tmp_path / "extract"
            tar.extractall(out, filter="data")  # would raise on a member escaping `out`
        assert all(p.parent == out for p in out.iterdir())


def test_odd_input_file_names_give_safe_shard_ids():
    for name in ["../../evil.parquet", "a b/c$d.tar", "..parquet", "x/../../y.tar.gz", "\u00e9t\u00e9.parquet"]:
        sid = inputs.make_shard_id(name, {"size": 1})
        assert re.fullmatch(r"[A-Za-z0-9_.-]+", sid) and not sid.startswith(".") and "/" not in sid, sid
