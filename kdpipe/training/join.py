"""Training's read step: one input shard joined by sample_key with each chosen teacher's unit.

The join checks each unit's checksum and that its sample keys are exactly the shard's, then emits
rows with the teachers' targets. Free of torch, so read workers start fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kdpipe import storage
from kdpipe.data import images, inputs
from kdpipe.data.inputs import InputShard
from kdpipe.data.readers import cut_geometry, read_samples, shard_dataset, view_key
from kdpipe.errors import CacheError, ConfigError
from kdpipe.labels import cache, codec, softlabels


@dataclass(frozen=True)
class TeacherUnits:
    """One teacher's committed labels for the dataset, as the read tasks need them: where the
    units live, how they are stored, and the unit record of each input shard."""

    teacher: str  # the spec the user chose: a name, or name@digest
    directory: str  # URI of the teacher's cache directory
    storage_options: dict[str, Any]
    mode: str  # full | topk
    format: str  # parquet | webdataset
    k: int | None  # top-k labels: the classes stored per row
    temperature: float  # the generation temperature (top-k probabilities are exact at it)
    augment: dict[str, Any] | None  # labels.views settings when augmented views were labelled
    records: dict[str, dict[str, Any]]  # shard_id -> the unit record committed in the manifest


@dataclass(frozen=True)
class MeanTarget:
    """The teachers' weighted mean distribution, formed once when read (softlabels.ensemble_probs):
    one weight and one temperature per teacher."""

    weights: tuple[float, ...]
    temperatures: tuple[float, ...]


@dataclass(frozen=True)
class JoinPlan:
    """What the read step makes of the teachers' units: see read_joined_shard."""

    num_classes: int
    temperatures: tuple[float, ...] = ()  # per teacher, its training temperature (top-k bins are formed at it)
    topk_k: int | None = None  # set: every row gets top-k bins of this k (some teacher stored top-k labels)
    replay: int = 0  # V > 0: rows carry all V cached augmented views (train.augment=replay)
    ensemble: MeanTarget | None = None  # set: rows carry the teachers' mean distribution only


def _select(rows: dict[str, Any], index: np.ndarray) -> dict[str, Any]:
    """The rows `index` of a decoded unit (every per-row entry)."""
    keys = np.asarray(rows["keys"], dtype=object)
    return {k: (keys[index].tolist() if k == "keys" else np.asarray(v)[index]) for k, v in rows.items()}


def read_joined_shard(batch: dict[str, np.ndarray], source: inputs.SourceSpec, shards: dict[str, InputShard],
                      geometry: dict[str, Any], units: list[TeacherUnits] | tuple[TeacherUnits, ...],
                      plan: JoinPlan, geometries: dict[str, dict[str, Any]] | None = None) -> dict[str, np.ndarray]:
    """Training's read step: one input shard, joined by sample_key with each teacher's unit for it.

    Rows get x (uint8 [N, C, H, W] in the student's geometry; normalised on the worker), label,
    and either teacher_logits [N, K, C] (every teacher stored full logits), or teacher_probs
    [N, C] when plan.ensemble is set (the teachers' weighted mean distribution,
    softlabels.ensemble_probs: all a mean-ensemble KL needs, K times smaller), or, when
    plan.topk_k is set, topk_ids / topk_probs [N, K, k] and topk_tail [N, K], each teacher's
    at its training temperature plan.temperatures[k].

    With plan.replay = V (units generated with labels.views = V), rows carry all V augmented
    views instead: x [N, V, C, H, W], cut from the decoded image with the view params stored in
    the units, and the teachers' labels of those very views, [N, V, K, C] (or [N, V, K, k]); the
    training loop picks one view per sample per epoch."""
    shard = shards[str(batch["shard_id"][0])]
    s = read_samples(shard, source)
    keys = np.asarray(s.keys, dtype=str)
    order = np.argsort(keys, kind="stable")  # unit files are sorted by key
    replay = int(plan.replay or 0)
    out: dict[str, np.ndarray] = {} if replay else {"x": cut_geometry(s, geometry, shard)[order]}
    for name, g in (geometries or {}).items():  # online distillation: the teachers' own geometries
        out[name] = cut_geometry(s, g, shard)[order]
    if s.labels is not None:
        out["label"] = s.labels[order]
    uri, shard_id = shard.uri, shard.shard_id
    teacher_rows = []
    params = None
    for unit in units:
        record = unit.records.get(shard_id)
        where = f"teacher {unit.teacher!r} unit {shard_id}"
        if record is None:
            raise CacheError(f"{where}: no committed labels for input shard {uri} "
                             f"in {unit.directory}; run `kdpipe generate` for this dataset")
        fs, directory = storage.filesystem(unit.directory, unit.storage_options)
        path = cache.unit_part_path(directory, record)
        payload = fs.cat_file(path)
        if storage.sha256_bytes(payload) != record["sha256"]:
            raise CacheError(f"{where}: {fs.unstrip_protocol(path)} does not match its recorded checksum "
                             "(corrupt or modified); delete the unit record and rerun `kdpipe generate`")
        try:
            rows = codec.decode_unit(payload, unit.mode, unit.format)
        except Exception as e:  # pyarrow and tarfile raise several types for damaged files
            raise CacheError(f"{where}: {fs.unstrip_protocol(path)} cannot be read ({e})") from e
        aug = rows.get(softlabels.AUG)
        plain = rows if aug is None else _select(rows, np.flatnonzero(aug[:, 2] == 0))
        unit_keys = np.asarray(plain["keys"], dtype=str)
        if len(unit_keys) != len(keys) or not np.array_equal(unit_keys, keys[order]):
            diff = sorted(set(unit_keys.tolist()) ^ set(keys.tolist()))[:3]
            raise CacheError(f"{where}: sample keys differ from input shard {uri} "
                             f"({len(unit_keys)} vs {len(keys)} rows; e.g. {diff}); regenerate the labels")
        if replay:
            if aug is None:
                raise CacheError(f"{where}: train.augment=replay needs labels of augmented views; "
                                 "generate with labels.views > 0")
            position = {k: i for i, k in enumerate(rows["keys"])}
            try:
                index = np.asarray([[position[view_key(k, j)] for j in range(replay)] for k in unit_keys], np.int64)
            except KeyError as e:
                raise CacheError(f"{where}: no labels for view {e.args[0]!r}: the unit holds fewer than "
                                 f"{replay} views; regenerate with labels.geometries={replay}") from None
            mine = aug[index]  # [N, V, 5]
            if params is None:
                params = mine
            elif not np.array_equal(params, mine):
                raise CacheError(f"{where}: its views differ from teacher {units[0].teacher!r}'s "
                                 "(other labels.view_seed / crop_scale / flip): generate them together")
            plain = _select(rows, index.reshape(-1))
        teacher_rows.append((unit, plain))
    if replay:
        if params is None:
            raise ConfigError("train.augment=replay needs teachers: their units hold the view params")
        imgs = [s.images[i] for i in order]
        out["x"] = images.augmented(imgs, params, geometry)  # [N, V, C, H, W]
    shape = (len(keys), replay) if replay else (len(keys),)
    if teacher_rows and plan.topk_k:
        bins = [softlabels.student_targets(rows, unit.mode, plan.topk_k, unit.temperature, t, plan.num_classes)
                for (unit, rows), t in zip(teacher_rows, plan.temperatures, strict=True)]
        stacked = [np.stack(a, axis=1) for a in zip(*bins, strict=True)]  # [N*V, K, ...]
        out["topk_ids"], out["topk_probs"], out["topk_tail"] = (a.reshape(*shape, *a.shape[1:]) for a in stacked)
    elif teacher_rows:
        z = np.stack([rows[softlabels.LOGITS] for _, rows in teacher_rows], axis=1)  # [N*V, K, C]
        if plan.ensemble:  # the loss needs only the teachers' mean distribution: form it once
            p = softlabels.ensemble_probs(z, list(plan.ensemble.temperatures), list(plan.ensemble.weights))
            out["teacher_probs"] = p.reshape(*shape, p.shape[-1])
        else:
            out["teacher_logits"] = z.reshape(*shape, *z.shape[1:])
    return out


def student_dataset(source: inputs.SourceSpec, shards: list[inputs.InputShard], pre,
                    units: list[TeacherUnits] | tuple[TeacherUnits, ...], plan: JoinPlan, geometries: dict[str, dict[str, Any]] | None = None,
                    decode_cpus: float | None = None):
    """The student's input stream: one read task per input shard, joined with the teachers' units
    (or, for online distillation, carrying the pixels of the teachers' own `geometries` instead)."""
    return shard_dataset(shards, read_joined_shard, decode_cpus, source=source, geometry=pre.geometry(),
                         units=units, plan=plan, geometries=geometries)
