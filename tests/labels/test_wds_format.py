"""WebDataset units: read back by the real webdataset library, keys escaped reversibly, fixed bytes."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import webdataset

from kdpipe.labels import codec, softlabels

KEYS = ["b/2", "a.jpg", "a/b.c%d", "c", "x%2E", "tab\tkey", "ünï.cødé"]


@pytest.mark.parametrize("key", KEYS + ["%", ".", "/", "..", "a%2Fb", "%%2E."])
def test_key_escape_round_trips_and_has_no_dot_or_slash(key):
    name = codec.wds_key(key)
    assert "." not in name and "/" not in name
    assert codec.unwds_key(name) == key


def test_key_escape_is_injective():
    names = [codec.wds_key(k) for k in ["a.b", "a%2Eb", "a%252Eb", "a/b", "a%2Fb"]]
    assert len(set(names)) == len(names)
    with pytest.raises(ValueError):
        codec.wds_key("")


def full_unit(dtype: str = "float16"):
    z = (np.random.default_rng(0).normal(size=(len(KEYS), 10)) * 4).astype(dtype)
    return KEYS, {softlabels.LOGITS: z}


def topk_unit(k: int = 3, dtype: str = "float16"):
    z = (np.random.default_rng(1).normal(size=(len(KEYS), 10)) * 4).astype(np.float32)
    return KEYS, softlabels.topk_arrays(z, k, 2.0, dtype)


def read_with_webdataset(tmp_path, data: bytes) -> list[dict]:
    path = tmp_path / "part-0.tar"
    path.write_bytes(data)
    return list(webdataset.WebDataset(str(path), shardshuffle=False))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_full_unit_is_read_by_webdataset(tmp_path, dtype):
    keys, arrays = full_unit(dtype)
    samples = read_with_webdataset(tmp_path, codec.webdataset_bytes(keys, arrays, "full"))
    order = np.argsort(keys)
    assert len(samples) == len(keys)
    assert [codec.unwds_key(s["__key__"]) for s in samples] == sorted(keys)
    for sample, i in zip(samples, order, strict=True):
        row = np.load(io.BytesIO(sample["logits.npy"]), allow_pickle=False)
        assert row.dtype == np.dtype(dtype) and np.array_equal(row, arrays[softlabels.LOGITS][i])
        assert int(sample["cls"]) == int(arrays[softlabels.LOGITS][i].argmax())


def test_topk_unit_is_read_by_webdataset(tmp_path):
    keys, arrays = topk_unit()
    samples = read_with_webdataset(tmp_path, codec.webdataset_bytes(keys, arrays, "topk"))
    order = np.argsort(keys)
    assert [codec.unwds_key(s["__key__"]) for s in samples] == sorted(keys)
    for sample, i in zip(samples, order, strict=True):
        rec = np.load(io.BytesIO(sample["topk.npy"]), allow_pickle=False)
        assert rec.shape == () and rec[softlabels.TOPK_VALUES].dtype == np.float16
        assert np.array_equal(rec[softlabels.TOPK_VALUES], arrays[softlabels.TOPK_VALUES][i])
        assert np.array_equal(rec[softlabels.TOPK_IDS], arrays[softlabels.TOPK_IDS][i])
        assert rec[softlabels.LOG_Z] == arrays[softlabels.LOG_Z][i]
        assert int(sample["cls"]) == int(arrays[softlabels.TOPK_IDS][i, 0])


@pytest.mark.parametrize("mode", ["full", "topk"])
def test_read_webdataset_unit_round_trips(mode):
    keys, arrays = full_unit() if mode == "full" else topk_unit()
    back = codec.read_webdataset_unit(codec.webdataset_bytes(keys, arrays, mode))
    order = np.argsort(keys)
    assert back["keys"] == sorted(keys) and back["mode"] == mode
    for name, array in arrays.items():
        assert back[name].dtype == array.dtype and np.array_equal(back[name], array[order])
    top1 = arrays[softlabels.LOGITS].argmax(1) if mode == "full" else arrays[softlabels.TOPK_IDS][:, 0]
    assert np.array_equal(back["cls"], top1[order])


@pytest.mark.parametrize("mode", ["full", "topk"])
def test_unit_bytes_are_deterministic_with_fixed_headers(mode):
    keys, arrays = full_unit() if mode == "full" else topk_unit()
    a = codec.webdataset_bytes(keys, arrays, mode)
    assert a == codec.webdataset_bytes(keys, arrays, mode)
    # Input row order does not matter: samples are sorted by key.
    perm = np.random.default_rng(2).permutation(len(keys))
    shuffled = {name: array[perm] for name, array in arrays.items()}
    assert a == codec.webdataset_bytes([keys[i] for i in perm], shuffled, mode)
    with tarfile.open(fileobj=io.BytesIO(a)) as tar:
        members = tar.getmembers()
    assert len(members) == 2 * len(keys)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


def test_empty_unit_and_bad_inputs():
    empty = codec.webdataset_bytes([], {softlabels.LOGITS: np.zeros((0, 3), np.float16)}, "full")
    assert codec.read_webdataset_unit(empty)["keys"] == []
    z = {softlabels.LOGITS: np.zeros((2, 3), np.float16)}
    with pytest.raises(ValueError, match="distinct"):
        codec.webdataset_bytes(["a", "a"], z, "full")
    with pytest.raises(ValueError, match="mode"):
        codec.webdataset_bytes(["a", "b"], z, "bogus")
    with pytest.raises(ValueError, match="float64"):
        codec.webdataset_bytes(["a", "b"], {softlabels.LOGITS: np.zeros((2, 3))}, "full")


def test_mixed_or_incomplete_units_are_refused():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("a.cls", "a.logits.npy", "b.cls"):
            tar.addfile(tarfile.TarInfo(name), io.BytesIO(b""))
    with pytest.raises(ValueError, match="'b'"):
        codec.read_webdataset_unit(buf.getvalue())
