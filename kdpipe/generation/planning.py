"""What generation would do, found without writing anything: the teachers (validated, with
digests), the input shards, and per teacher the units committed or reusable."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdpipe import storage
from kdpipe.config import Config, labels_for, preprocess_for, teacher_precision
from kdpipe.data import inputs
from kdpipe.errors import ConfigError
from kdpipe.labels import cache
from kdpipe.teachers.checkpoints import TeacherInfo, inspect_teacher


def _shard_plan(fs, shards: list[inputs.InputShard], dirs: dict[str, str]) -> dict[str, dict[str, dict]]:
    """{teacher: {shard_id: committed unit record}} for the units already in the cache: a few
    requests per teacher directory, not one per shard (cache.committed_units)."""
    wanted = [s.shard_id for s in shards]
    return {name: cache.committed_units(fs, directory, wanted) for name, directory in dirs.items()}


def label_settings_for(cfg: Config, teacher: str) -> dict[str, Any]:
    """cache.label_settings() of `teacher` under `cfg` (its `labels` section with the teacher's
    overrides; class names default to "0".."C-1"): what generation stores and hashes into the unit
    directory, and what a student asks the cache for."""
    lab, data = labels_for(cfg, teacher), cfg.data
    names = data.class_names or [str(i) for i in range(data.num_classes)]
    augment = {"views": lab.views, "seed": lab.view_seed, "crop_scale": lab.crop_scale, "flip": lab.flip}
    return cache.label_settings(lab.temperature, lab.mode, lab.dtype, lab.format, data.num_classes, names,
                                lab.k, augment)


def inspect_teachers(cfg: Config) -> list[TeacherInfo]:
    """Validate every teacher before any work starts (checkpoint, architecture, class count)."""
    infos = []
    for t in cfg.teachers:
        pre = preprocess_for(cfg, t.name)
        infos.append(inspect_teacher(t.name, t.arch, t.checkpoint, cfg.cache.storage_options, cfg.data.num_classes,
                                     pre.image_shape, pre.spec(), cfg.allow_import, teacher_precision(t)))
    return infos


@dataclass
class Inventory:
    """What generation would do, found without writing anything: the teachers (validated, with
    digests), the input shards, and per teacher its unit directory, the units committed there and
    those committed for another version of the dataset that can be referenced instead."""

    infos: list[TeacherInfo]
    source: inputs.SourceSpec
    shards: list[inputs.InputShard]
    fingerprint: str
    settings: dict[str, dict[str, Any]]
    label_hash: dict[str, str]
    fs: Any
    root: str
    dirs: dict[str, str]
    done: dict[str, dict[str, dict]]
    reusable: dict[str, dict[str, dict]]

    def missing(self, name: str) -> list[str]:
        have = self.done[name].keys() | self.reusable[name].keys()
        return [s.shard_id for s in self.shards if s.shard_id not in have]


def inventory(cfg: Config) -> Inventory:
    if not cfg.teachers:
        raise ConfigError("no teachers configured: add at least one entry under `teachers` (or a `registry`)")
    infos = inspect_teachers(cfg)
    source = inputs.source_spec(cfg.data, check_holdout=False)
    shards = inputs.list_shards(cfg.data.train, source)
    fingerprint = inputs.fingerprint(shards, source)
    settings = {i.name: label_settings_for(cfg, i.name) for i in infos}
    label_hash = {name: cache.settings_hash(s) for name, s in settings.items()}
    fs, root = storage.filesystem(cfg.cache.root, cfg.cache.storage_options)
    dirs = {i.name: cache.unit_dir(root, i.name, i.digest, fingerprint, label_hash[i.name]) for i in infos}
    done = _shard_plan(fs, shards, dirs)
    # Same teacher, same labels, an input shard committed for another dataset version (e.g.
    # before new shards arrived): reference it instead of relabelling.
    reusable = {name: cache.find_reusable_units(fs, directory, [s.shard_id for s in shards
                                                                if s.shard_id not in done[name]])
                for name, directory in dirs.items()}
    return Inventory(infos, source, shards, fingerprint, settings, label_hash, fs, root, dirs, done, reusable)
