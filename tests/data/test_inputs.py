"""Input readers on real files through fsspec (local disk and memory://), without Ray:
ImageFolder, WebDataset and Parquet (pixels, PNG bytes, label-free), preprocessing views,
and every bad input the readers refuse or, under on_bad_sample=skip, record."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from sklearn.datasets import load_digits

from kdpipe import config, storage
from kdpipe.data import digits, images, inputs, readers

DIGITS = load_digits()
IDX = np.arange(60)


def _data(root: str, fmt: str, **over) -> config.DataConfig:
    d = config.DataConfig(builtin=None, format=fmt, train=f"{root}/train", holdout=f"{root}/holdout")
    for k, v in over.items():
        setattr(d, k, v)
    return d


def _write(root: str, layout: str, idx=IDX, parts: int = 3, upsample: int = 1, labelled: bool = True) -> None:
    fs, path = storage.filesystem(f"{root}/train")
    digits.write_split(fs, path, "train", idx, DIGITS.images, DIGITS.target, layout, parts, upsample, labelled)


def _read_all(d: config.DataConfig, source=None):
    source = source or inputs.source_spec(d, check_holdout=False)
    shards = inputs.list_shards(d.train, source)
    out = [readers.read_samples(s, source) for s in shards]
    return shards, out


@pytest.mark.parametrize("root", ["local", "memory://kdpipe-inputs"])
@pytest.mark.parametrize("layout", ["parquet", "parquet-png", "webdataset", "imagefolder"])
def test_every_format_reads_the_same_digits(tmp_path, root, layout):
    root = str(tmp_path) if root == "local" else f"{root}-{layout}"
    _write(root, layout)
    d = _data(root, "parquet" if layout.startswith("parquet") else layout, files_per_shard=4)
    shards, samples = _read_all(d)
    keys = [k for s in samples for k in s.keys]
    expect = {(f"{DIGITS.target[i]}/" if layout == "imagefolder" else "") + f"digits-{i:04d}" + (
        ".png" if layout == "imagefolder" else ""): i for i in IDX}
    assert sorted(keys) == sorted(expect)  # every sample exactly once, keyed from the source
    for s in samples:
        x = images.apply_geometry(s.images, {"channels": 1, "resize": None, "size": [8, 8]})
        for key, img, y in zip(s.keys, x, s.labels, strict=True):
            i = expect[key]
            assert y == DIGITS.target[i]
            assert np.array_equal(img[0], DIGITS.images[i].astype(np.uint8))
    if layout == "imagefolder":  # shards are chunks of files_per_shard files within a class folder
        assert all(s.num_rows <= 4 for s in shards) and sum(s.num_rows for s in shards) == len(IDX)
    assert [s.shard_id for s in inputs.list_shards(d.train, inputs.source_spec(d, False))] == \
        [s.shard_id for s in shards]


def test_webdataset_written_by_tarwriter(tmp_path):
    (tmp_path / "train").mkdir()
    with wds.TarWriter(str(tmp_path / "train" / "part-000.tar")) as sink:
        for i in IDX[:20]:
            sink.write({"__key__": f"sample{i:03d}", "png": images.encode_png(DIGITS.images[i].astype(np.uint8)),
                        "cls": int(DIGITS.target[i])})
    _, [s] = _read_all(_data(str(tmp_path), "webdataset"))
    assert s.keys == [f"sample{i:03d}" for i in IDX[:20]]
    assert s.labels.tolist() == DIGITS.target[:20].tolist()


def test_parquet_without_labels_is_label_free_data(tmp_path):
    _write(str(tmp_path), "parquet-png", labelled=False)
    _, samples = _read_all(_data(str(tmp_path), "parquet", label_column=None))
    assert sum(len(s.keys) for s in samples) == len(IDX) and all(s.labels is None for s in samples)


def test_resize_recovers_the_original_and_views_share_one_decode(tmp_path, monkeypatch):
    _write(str(tmp_path), "parquet-png", parts=1, upsample=2)
    d = _data(str(tmp_path), "parquet")
    source = inputs.source_spec(d, False)
    [shard] = inputs.list_shards(d.train, source)
    decoded = []
    real_decode = images.decode
    monkeypatch.setattr(images, "decode", lambda b: decoded.append(1) or real_decode(b))
    small = {"channels": 1, "resize": [8, 8], "size": [8, 8]}
    rgb = {"channels": 3, "resize": 14, "size": [12, 12]}
    rows = readers.read_teacher_inputs({"shard_id": np.array([shard.shard_id])}, source, {shard.shard_id: shard},
                               {"a": small, "b": rgb})
    assert len(decoded) == len(IDX)  # two views, one decode per image
    assert rows["a"].shape == (60, 1, 8, 8) and rows["b"].shape == (60, 3, 12, 12)
    original = DIGITS.images[IDX].astype(np.float32)
    assert np.abs(rows["a"][:, 0] - original).mean() < 1.5  # bilinear 16 -> 8 of a 2x upsample
    assert np.array_equal(rows["b"][:, 0], rows["b"][:, 2])  # grey -> RGB repeats the channel
    assert rows["shard_rows"].tolist() == [60] * 60 and not rows["placeholder"].any()


def test_preprocess_normalises_per_channel():
    pre = images.make_preprocess([3, 2, 2], None, 1 / 255, [0.5, 0.4, 0.3], [0.2, 0.2, 0.1])
    x = np.full((1, 3, 2, 2), 255, np.uint8)
    assert np.allclose(pre.normalise(x)[0, :, 0, 0], [2.5, 3.0, 7.0])
    import torch

    assert torch.allclose(pre.normalise(torch.from_numpy(x))[0, :, 0, 0], torch.tensor([2.5, 3.0, 7.0]))


# --- bad input ----------------------------------------------------------------------------------


def test_undecodable_image_is_named_or_skipped_and_listed(tmp_path):
    _write(str(tmp_path), "imagefolder")
    (tmp_path / "train" / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    d = _data(str(tmp_path), "imagefolder")
    with pytest.raises(ValueError, match=r"sample '3/broken.png': not a readable image.*on_bad_sample: skip"):
        _read_all(d)
    d.on_bad_sample = "skip"
    _, samples = _read_all(d)
    assert sum(len(s.keys) for s in samples) == len(IDX)
    skipped = [x for s in samples for x in s.skipped]
    assert [x["key"] for x in skipped] == ["3/broken.png"] and "not a readable image" in skipped[0]["reason"]


def test_empty_shard_is_named_or_recorded(tmp_path):
    _write(str(tmp_path), "parquet")
    empty = pa.table({"sample_key": pa.array([], pa.string()), "image": pa.array([], pa.list_(pa.uint8())),
                      "label": pa.array([], pa.int64())})
    pq.write_table(empty, str(tmp_path / "train" / "train-empty.parquet"))
    d = _data(str(tmp_path), "parquet")
    with pytest.raises(ValueError, match=r"train-empty.parquet.* is empty"):
        inputs.list_shards(d.train, inputs.source_spec(d, False))
    d.on_bad_sample = "skip"
    shards, samples = _read_all(d)
    [empty_samples] = [s for sh, s in zip(shards, samples, strict=True) if sh.uri.endswith("train-empty.parquet")]
    assert empty_samples.keys == [] and empty_samples.skipped == [{"key": "", "reason": "empty shard"}]


def test_empty_tar_is_named(tmp_path):
    (tmp_path / "train").mkdir()
    with tarfile.open(tmp_path / "train" / "empty.tar", "w"):
        pass
    with pytest.raises(ValueError, match=r"empty.tar.* is empty"):
        _read_all(_data(str(tmp_path), "webdataset"))


def test_truncated_tar_names_the_file(tmp_path):
    _write(str(tmp_path), "webdataset", parts=1)
    path = tmp_path / "train" / "train-00000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(ValueError, match=r"train-00000.tar.* truncated or corrupt tar file"):
        _read_all(_data(str(tmp_path), "webdataset"))


def test_missing_label_column_names_the_shard_and_column(tmp_path):
    _write(str(tmp_path), "parquet-png", labelled=False)
    with pytest.raises(ValueError, match=r"train-00000.parquet' has no column 'label'.*label_column: null"):
        _read_all(_data(str(tmp_path), "parquet"))


def test_class_folders_that_differ_between_splits_are_refused(tmp_path):
    _write(str(tmp_path), "imagefolder")
    fs, holdout = storage.filesystem(str(tmp_path / "holdout"))
    few = np.array([i for i in range(100, 200) if DIGITS.target[i] != 7])
    digits.write_split(fs, holdout, "holdout", few, DIGITS.images, DIGITS.target, "imagefolder", 1)
    with pytest.raises(ValueError, match=r"class folders differ.*only in train \['7'\], only in held-out \[\]"):
        inputs.source_spec(_data(str(tmp_path), "imagefolder"))


def test_class_folder_count_must_match_num_classes(tmp_path):
    _write(str(tmp_path), "imagefolder", idx=np.array([i for i in IDX if DIGITS.target[i] < 5]))
    with pytest.raises(ValueError, match=r"5 class folders.*set data.num_classes=5"):
        inputs.source_spec(_data(str(tmp_path), "imagefolder"), check_holdout=False)


def test_bad_labels_and_pixels_and_duplicate_keys(tmp_path):
    (tmp_path / "train").mkdir()
    table = pa.table({"sample_key": ["a", "b", "c"],
                      "image": pa.array([[1] * 64, [1] * 63, [1] * 64], pa.list_(pa.uint8())),
                      "label": [3, 1, 12]})
    pq.write_table(table, str(tmp_path / "train" / "x.parquet"))
    d = _data(str(tmp_path), "parquet", on_bad_sample="skip")
    _, [s] = _read_all(d)
    assert s.keys == ["a"]
    assert [(x["key"], x["reason"].split(";")[0]) for x in s.skipped] == [
        ("b", "the image has 63 pixels"), ("c", "label 12 is outside [0, data.num_classes=10)")]
    d.on_bad_sample = "error"
    with pytest.raises(ValueError, match=r"x.parquet: sample 'b': the image has 63 pixels"):
        _read_all(d)
    dup = pa.table({"sample_key": ["a", "b", "a"], "image": pa.array([[1] * 64] * 3, pa.list_(pa.uint8())),
                    "label": [3, 1, 2]})
    pq.write_table(dup, str(tmp_path / "train" / "x.parquet"))
    with pytest.raises(ValueError, match=r"x.parquet: sample key 'a' appears more than once"):
        _read_all(d)


def test_images_smaller_than_the_model_input_need_a_resize(tmp_path):
    _write(str(tmp_path), "parquet-png", parts=1)
    d = _data(str(tmp_path), "parquet")
    source = inputs.source_spec(d, False)
    [shard] = inputs.list_shards(d.train, source)
    with pytest.raises(ValueError, match=r"train-00000.parquet: image is 8x8, smaller than the model input 16x16: set a `resize`"):
        readers.read_teacher_inputs({"shard_id": np.array([shard.shard_id])}, source, {shard.shard_id: shard},
                            {"v": {"channels": 1, "resize": None, "size": [16, 16]}})


def test_process_local_filesystems_are_refused_for_ray():
    with pytest.raises(ValueError, match="memory://x.*process-local"):
        storage.check_shared("memory://x")


def test_shard_ids_follow_content_not_position(tmp_path):
    _write(str(tmp_path), "imagefolder")
    d = _data(str(tmp_path), "imagefolder", files_per_shard=100)
    before = {s.uri.rsplit("/", 1)[1]: s.shard_id for s in inputs.list_shards(d.train, inputs.source_spec(d, False))}
    (tmp_path / "train" / "3" / "new.png").write_bytes(images.encode_png(DIGITS.images[0].astype(np.uint8)))
    after = {s.uri.rsplit("/", 1)[1]: s.shard_id for s in inputs.list_shards(d.train, inputs.source_spec(d, False))}
    assert [c for c in before if before[c] != after[c]] == ["3"]


def test_skip_list_travels_with_the_first_row(tmp_path):
    _write(str(tmp_path), "webdataset", parts=1)
    path = tmp_path / "train" / "extra.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("bad.png", b"junk"), ("bad.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    d = _data(str(tmp_path), "webdataset", on_bad_sample="skip")
    source = inputs.source_spec(d, False)
    shard = next(s for s in inputs.list_shards(d.train, source) if s.uri.endswith("extra.tar"))
    rows = readers.read_teacher_inputs({"shard_id": np.array([shard.shard_id])}, source, {shard.shard_id: shard},
                               {"v": {"channels": 1, "resize": None, "size": [8, 8]}})
    assert rows["placeholder"].tolist() == [True] and rows["shard_rows"].tolist() == [0]
    assert json.loads(rows["skipped"][0])[0]["key"] == "bad"


# --- the source spec ------------------------------------------------------------------------------


def test_source_spec_is_frozen_and_pickles(tmp_path):
    import dataclasses
    import pickle

    import cloudpickle

    d = _data(str(tmp_path), "parquet", storage_options={"anon": True, "client_kwargs": {"region_name": "x"}},
              class_names=[str(i) for i in range(10)])
    spec = inputs.source_spec(d, check_holdout=False)
    assert isinstance(spec, inputs.SourceSpec)
    assert spec.pixel_shape == (1, 8, 8) and spec.class_names == tuple(str(i) for i in range(10))
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):  # Ray: cloudpickle
        back = loads(dumps(spec))
        assert back == spec and back is not spec
        assert back.storage_options == {"anon": True, "client_kwargs": {"region_name": "x"}}
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.on_bad_sample = "skip"
    d.storage_options["anon"] = False  # the spec holds its own copy
    d.class_names.append("ten")
    assert spec.storage_options["anon"] is True and len(spec.class_names) == 10


SHARDS = [inputs.InputShard(f"part-{i}-0000000{i}", f"/x/part-{i}.parquet", 10, {"size": i}) for i in (2, 0, 1)]


def _old_fingerprint(shards, data: config.DataConfig, class_names: list[str]) -> str:
    """The fingerprint as kdpipe computed it from the plain-dict source spec it used to have."""
    import hashlib

    what = {"format": data.format, "key_column": data.key_column, "image_column": data.image_column,
            "label_column": data.label_column}
    if data.format == "parquet":
        what["pixel_shape"] = list(data.pixel_shape or data.image_shape)
    if data.format == "imagefolder":
        what["class_names"] = list(class_names)
    body = json.dumps({"shards": sorted(s.shard_id for s in shards), "source": what}, sort_keys=True)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


@pytest.mark.parametrize("over, pinned", [
    ({}, "590a6b770a76ddac"),
    ({"label_column": None, "pixel_shape": [1, 8, 8], "key_column": "k"}, "053c3b03f0747fcb"),
    ({"format": "webdataset"}, "fdee42dd65a97718"),
    ({"image_shape": [3, 32, 32], "class_names": [str(i) for i in range(10)]}, "3dd9f19fb8cb0d08"),
])
def test_fingerprint_is_what_it_was_before_the_typed_spec(over, pinned):
    """Fingerprints name cache directories: existing caches must keep matching. `pinned` was
    computed by kdpipe before the spec became a dataclass."""
    d = config.DataConfig(train="/nowhere", **over)
    spec = inputs.source_spec(d, check_holdout=False)
    assert inputs.fingerprint(SHARDS, spec) == _old_fingerprint(SHARDS, d, d.class_names) == pinned
    assert inputs.fingerprint(SHARDS[:2], spec) != pinned  # the shards count


def test_imagefolder_fingerprint_is_what_it_was_and_follows_the_class_order(tmp_path):
    _write(str(tmp_path), "imagefolder", idx=np.array([i for i in IDX if DIGITS.target[i] < 2]))
    d = _data(str(tmp_path), "imagefolder", num_classes=2)
    spec = inputs.source_spec(d, check_holdout=False)
    assert spec.class_names == ("0", "1")
    shards = inputs.list_shards(d.train, spec)
    assert inputs.fingerprint(shards, spec) == _old_fingerprint(shards, d, ["0", "1"])
    d.class_names = ["1", "0"]  # other labels, other labels' cache
    swapped = inputs.source_spec(d, check_holdout=False)
    assert inputs.fingerprint(shards, swapped) == _old_fingerprint(shards, d, ["1", "0"]) != \
        inputs.fingerprint(shards, spec)
    hand = inputs.SourceSpec("imagefolder", {}, "sample_key", "image", "label", (1, 8, 8), ("cat", "dog"), 2,
                             "error", 1000)
    assert inputs.fingerprint(SHARDS, hand) == "d92977acb889d2ca"  # computed before the spec was typed


# --- kdpipe errors --------------------------------------------------------------------------------


def test_a_bad_sample_is_an_input_error_naming_the_shard_and_key(tmp_path):
    from kdpipe.errors import InputError, KdpipeError

    (tmp_path / "train").mkdir()
    good = images.encode_png(DIGITS.images[0].astype(np.uint8))
    pq.write_table(pa.table({"sample_key": ["a", "b"], "image": [good, b"not an image"], "label": [1, 2]}),
                   str(tmp_path / "train" / "x.parquet"))
    with pytest.raises(InputError) as e:
        _read_all(_data(str(tmp_path), "parquet"))
    assert isinstance(e.value, KdpipeError) and isinstance(e.value, ValueError)  # the CLI's, and the builtin
    message = str(e.value)
    assert f"input shard file://{tmp_path}/train/x.parquet: sample 'b': not a readable image" in message, message


def test_missing_and_unlisted_inputs_are_kdpipe_errors(tmp_path):
    from kdpipe.errors import InputError, StorageMissing

    d = _data(str(tmp_path), "parquet")
    with pytest.raises(StorageMissing, match=r"input dataset '.*train' does not exist: check data.train"):
        inputs.list_shards(d.train, inputs.source_spec(d, False))
    (tmp_path / "train").mkdir()
    with pytest.raises(InputError, match=r"input dataset '.*train' holds no .parquet files"):
        inputs.list_shards(d.train, inputs.source_spec(d, False))


def test_an_unknown_protocol_is_a_config_error_naming_the_uri():
    with pytest.raises(config.ConfigError, match=r"URI 'nosuchproto://b/k': .*nosuchproto"):
        storage.filesystem("nosuchproto://b/k")


def test_each_read_task_carries_only_its_own_shard():
    """shard_dataset's rows carry one pickled shard each (an ImageFolder shard lists its files);
    the read step gets {its shard} and the batch it always had."""
    import pickle

    from kdpipe.data import readers
    from kdpipe.data.inputs import InputShard

    shards = [InputShard(f"cls{i}-0000000{i}", f"file:///d/cls{i}", 3, {"size": 3}, "file:///d",
                         tuple(f"cls{i}/{j}.png" for j in range(3))) for i in range(3)]
    seen = {}

    def read(batch, shards, scale):
        seen.update(shards=shards, columns=sorted(batch), scale=scale)
        return {"rows": np.array([len(next(iter(shards.values())).members)])}

    batch = {"shard_id": np.array([shards[1].shard_id]),
             readers.SHARD_COLUMN: np.array([pickle.dumps(shards[1])], dtype=object)}
    out = readers.read_own_shard(batch, read=read, scale=2)
    assert seen == {"shards": {shards[1].shard_id: shards[1]}, "columns": ["shard_id"], "scale": 2}
    assert out["rows"].tolist() == [3]
