"""Stored soft labels: sorted, exact at float32, within float16 tolerance, probabilities sum to 1."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest

from kdpipe import storage
from kdpipe.errors import CacheError, CacheMissing, InputError, KdpipeError
from kdpipe.labels import cache, codec, softlabels


def test_softmax_matches_direct_formula_and_sums_to_one():
    z = np.random.default_rng(0).normal(size=(50, 10)) * 5
    for T in (1.0, 4.0):
        p = softlabels.softmax(z, T)
        e = np.exp(z / T)
        assert np.allclose(p, e / e.sum(-1, keepdims=True))
        assert np.allclose(p.sum(-1), 1.0)


@pytest.mark.parametrize("dtype, atol", [("float32", 1e-6), ("float16", 2e-3)])
def test_unit_roundtrip_keeps_soft_labels(dtype, atol):
    rng = np.random.default_rng(1)
    keys = [f"k{i:03d}" for i in rng.permutation(40)]
    z = rng.normal(size=(40, 10)).astype(np.float32) * 4
    table = codec.labels_table(keys, z, dtype)
    back = pq.read_table(io.BytesIO(codec.parquet_bytes(table, 16)))
    assert back.schema.field(softlabels.LOGITS).type.list_size == 10  # fixed-size list
    stored_keys = back.column(softlabels.KEY).to_pylist()
    assert stored_keys == sorted(keys)
    order = np.argsort(keys)
    p_stored = softlabels.softmax(codec.table_logits(back), 4.0)
    assert np.allclose(p_stored, softlabels.softmax(z[order], 4.0), atol=atol)
    assert np.allclose(p_stored.sum(-1), 1.0)


def test_unit_bytes_are_deterministic():
    z = np.arange(30, dtype=np.float32).reshape(3, 10)
    a = codec.parquet_bytes(codec.labels_table(["b", "a", "c"], z, "float16"), 1024)
    b = codec.parquet_bytes(codec.labels_table(["b", "a", "c"], z, "float16"), 1024)
    assert a == b


def test_non_finite_teacher_output_is_refused_naming_the_sample():
    z = np.zeros((3, 4), dtype=np.float32)
    z[2, 1] = np.nan
    with pytest.raises(ValueError, match="'s2'") as e:
        softlabels.check_finite(z, ["s0", "s1", "s2"], "teacher 't'")
    assert isinstance(e.value, InputError)


def test_labels_that_would_be_stored_as_inf_are_refused_after_the_cast():
    """A logit of 81,000 is finite in float32 but Inf in float16: refused, naming the sample and
    the fix; float32 storage takes it. A top-k log-partition past float32 is refused too."""
    z = np.zeros((3, 4), dtype=np.float32)
    z[1, 2] = 81_000.0
    with pytest.raises(InputError, match=r"'s1' would be stored as Inf \(a logit of 81000 is beyond float16"
                                         r".*1 bad rows\): set labels.dtype: float32"):
        softlabels.check_storable(z, ["s0", "s1", "s2"], "teacher 't'", "float16", 5.0, topk=False)
    with pytest.raises(InputError, match="'s1'"):
        softlabels.check_storable(z, ["s0", "s1", "s2"], "teacher 't'", "float16", 5.0, topk=True)
    softlabels.check_storable(z, ["s0", "s1", "s2"], "teacher 't'", "float32", 5.0, topk=False)
    huge = np.full((2, 4), 3e38, dtype=np.float32)
    huge[0] = 0.0
    with pytest.raises(InputError, match=r"'s1' .*log-partition at T=0.5 is beyond float32"):
        softlabels.check_storable(huge, ["s0", "s1"], "teacher 't'", "float32", 0.5, topk=True)
    with pytest.raises(InputError, match="not finite"):
        softlabels.check_storable(np.full((1, 4), np.inf, np.float32), ["s0"], "teacher 't'", "float32", 1.0, False)


def test_labels_a_command_needs_but_the_cache_lacks_are_cache_errors(tmp_path):
    """No ref, no manifest, a manifest of another schema: errors the CLI prints (KdpipeError,
    exit status 2), still the FileNotFoundError / ValueError they were."""
    fs, root = storage.filesystem(str(tmp_path))
    with pytest.raises(CacheMissing, match=r"teacher 'ghost' has no labels .*run `kdpipe generate`") as e:
        cache.resolve_manifest(fs, root, "ghost", "fp", "abcd1234")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, KdpipeError)
    with pytest.raises(CacheMissing, match=r"no committed labels for 'ghost@0123' \(digest 0123\)"):
        cache.resolve_manifest(fs, root, "ghost@0123", "fp", "abcd1234")
    directory = cache.unit_dir(root, "ghost", "0123", "fp", "abcd1234")
    storage.write_json(fs, storage.join(directory, cache.MANIFEST), {"schema_version": 99})
    with pytest.raises(CacheError, match="schema version 99 is not supported"):
        cache.read_manifest(fs, directory)


def test_quality_figures():
    z = np.array([[5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    q = softlabels.summarize_quality([softlabels.quality(z, 1.0, np.array([0, 1, 1]))])
    assert q["rows"] == 3
    assert q["teacher_accuracy"] == pytest.approx(2 / 3)
    assert 0 < q["mean_entropy"] < np.log(2)
