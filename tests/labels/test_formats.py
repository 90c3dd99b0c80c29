"""Label formats end to end: top-k and full, Parquet and WebDataset, read back by other tools."""

from __future__ import annotations

import copy
import glob
import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kdpipe import config, storage
from kdpipe.data import inputs, readers
from kdpipe.generation import generate
from kdpipe.labels import cache, codec, softlabels, upkeep
from kdpipe.teachers.checkpoints import load_teacher

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def _generate(digits_cfg, tmp_path, mode, fmt, k=3):
    cfg = copy.deepcopy(digits_cfg)
    cfg.cache.root = str(tmp_path / "cache")
    cfg.teachers = cfg.teachers[1:2]  # cnn
    cfg.labels.mode, cfg.labels.format, cfg.labels.k = mode, fmt, k
    report = generate.generate(cfg, progress=False)
    fs, _ = storage.filesystem(cfg.cache.root)
    directory = fs._strip_protocol(report.teachers["cnn"].directory)
    return cfg, report, fs, directory, cache.read_manifest(fs, directory)


def _direct_logits(cfg):
    d, t = cfg.data, cfg.teachers[0]
    keys, x, _ = readers.load_split(d.train, inputs.source_spec(d), config.preprocess_for(cfg))
    model = load_teacher(t.name, t.arch, t.checkpoint, {}, d.num_classes, tuple(d.image_shape))
    with torch.no_grad():
        return dict(zip(keys, model(torch.from_numpy(x)).numpy(), strict=True))


@pytest.mark.parametrize("fmt", ["parquet", "webdataset"])
def test_topk_units_hold_exact_probabilities_and_tail(ray_cluster, digits_cfg, tmp_path, fmt):
    cfg, report, fs, directory, manifest = _generate(digits_cfg, tmp_path, "topk", fmt)
    T = cfg.labels.temperature
    assert manifest["labels"]["mode"] == "topk" and manifest["labels"]["k"] == 3
    assert 0 < manifest["quality"]["mean_topk_mass"] < 1
    assert "exact" in manifest["exactness"]
    direct = _direct_logits(cfg)
    seen = 0
    for unit in manifest["units"]:
        assert unit["part"].endswith(".parquet" if fmt == "parquet" else ".tar")
        rows = codec.decode_unit(fs.cat_file(cache.unit_part_path(directory, unit)), "topk", fmt)
        p = softlabels.topk_probs(rows[softlabels.TOPK_VALUES], rows[softlabels.LOG_Z], T)
        for key, ids, probs in zip(rows["keys"], rows[softlabels.TOPK_IDS], p, strict=True):
            full = softlabels.softmax(direct[key], T)
            assert list(ids) == list(np.argsort(-full, kind="stable")[:3])
            assert np.allclose(probs, full[ids], atol=2e-3)
            assert 1 - probs.sum() == pytest.approx(1 - full[ids].sum(), abs=2e-3)
            seen += 1
    assert seen == manifest["rows"] == 899
    assert upkeep.verify_cache(fs, directory) == []
    # A truncated unit is found by verify, naming it.
    path = cache.unit_part_path(directory, manifest["units"][0])
    original = fs.cat_file(path)
    fs.pipe_file(path, original[: len(original) // 3])
    try:
        faults = upkeep.verify_cache(fs, directory)
        assert len(faults) == 1 and manifest["units"][0]["shard_id"] in faults[0]
    finally:
        fs.pipe_file(path, original)


def test_parquet_units_read_by_pyarrow_and_pandas(ray_cluster, digits_cfg, tmp_path):
    cfg, report, fs, directory, manifest = _generate(digits_cfg, tmp_path, "topk", "parquet")
    files = sorted(glob.glob(f"{directory}/part-*.parquet"))
    table = pq.read_table(files[0])
    assert table.schema.field(softlabels.TOPK_VALUES).type.list_size == 3  # fixed-size lists
    frame = table.to_pandas()
    assert list(frame["sample_key"]) == sorted(frame["sample_key"])


def test_webdataset_units_read_by_webdataset_and_ray(ray_cluster, digits_cfg, tmp_path):
    import ray.data
    import webdataset as wds

    cfg, report, fs, directory, manifest = _generate(digits_cfg, tmp_path, "full", "webdataset")
    tars = sorted(glob.glob(f"{directory}/part-*.tar"))
    assert len(tars) == len(manifest["units"])
    samples = list(wds.WebDataset(tars[0], shardshuffle=False))
    keys = [s["__key__"] for s in samples]
    assert keys == sorted(keys) and len(keys) == manifest["units"][0]["rows"]
    direct = _direct_logits(cfg)
    first = np.load(io.BytesIO(samples[0]["logits.npy"]))
    assert np.allclose(first, direct[codec.unwds_key(keys[0])], atol=2e-2)
    assert int(samples[0]["cls"]) == int(np.argmax(direct[codec.unwds_key(keys[0])]))
    ds = ray.data.read_webdataset(tars, decoder=None)
    assert ds.count() == manifest["rows"]

