"""Test-only fault injection for generation (config `cache.inject_fault`).

The reliability tests use it to show what kdpipe promises when a process dies or storage goes
away at a known point of a real run; nothing else should set it. One fault per run:

  teacher_exit:teacher=NAME:call=N   the actor labelling for teacher NAME exits (os._exit, as an
                                     OOM kill would) at its N-th batch (default 1)
  driver_exit:units=N                the generation driver exits once N units are committed
  driver_pause:units=N:until=PATH    once N units are committed the driver creates PATH.paused
                                     and waits (up to 5 minutes) until PATH exists: a test can act
                                     at that point (stop the object store, start a second run...)

Every fault fires once per cache root: a marker under <cache.root>/_faults/ remembers it, so
rerunning the same command (with the same setting) runs clean, as a rerun after a real crash
would. (Train-side faults are train.inject_fault, see kdpipe.training.loop.)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from kdpipe import storage
from kdpipe.errors import ConfigError

log = logging.getLogger("kdpipe")

KINDS = ("teacher_exit", "driver_exit", "driver_pause")
EXIT_CODE = 70  # what an injected exit returns, to tell it from other failures


@dataclass(frozen=True)
class Fault:
    kind: str
    params: dict[str, str]
    marker: str  # fsspec URI: present once the fault has fired
    storage_options: dict[str, Any]

    def int(self, key: str, default: int) -> int:
        return int(self.params.get(key, default))


def parse(spec: str) -> tuple[str, dict[str, str]]:
    """"kind:k=v:k=v" -> (kind, {k: v}); ConfigError naming the problem."""
    kind, *pairs = spec.split(":")
    if kind not in KINDS:
        raise ConfigError(f"cache.inject_fault={spec!r}: unknown fault {kind!r}; known: {', '.join(KINDS)}")
    params = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        if not eq:
            raise ConfigError(f"cache.inject_fault={spec!r}: {pair!r} is not key=value")
        params[key] = value
    return kind, params


def for_cache(spec: str, cache_root: str, storage_options: dict[str, Any]) -> Fault | None:
    if not spec:
        return None
    kind, params = parse(spec)
    tag = "-".join([kind, *(params[k] for k in sorted(params) if k != "until")])
    return Fault(kind, params, storage.join(cache_root, "_faults", tag), dict(storage_options))


def _fired(fault: Fault) -> bool:
    fs, path = storage.filesystem(fault.marker, fault.storage_options)
    return fs.exists(path)


def _fire(fault: Fault) -> None:
    fs, path = storage.filesystem(fault.marker, fault.storage_options)
    storage.write_bytes(fs, path, f"{time.time()}\n".encode())


def teacher_call(fault: Fault | None, teacher: str, calls: int) -> None:
    """In a teacher actor, at its `calls`-th batch."""
    if fault is None or fault.kind != "teacher_exit" or fault.params.get("teacher") != teacher:
        return
    if calls == fault.int("call", 1) and not _fired(fault):
        _fire(fault)
        os._exit(EXIT_CODE)


def units_committed(fault: Fault | None, units: int) -> None:
    """In the generation driver, after each unit commit (`units` so far in this run)."""
    if fault is None or fault.kind not in ("driver_exit", "driver_pause") or units != fault.int("units", 1):
        return
    if _fired(fault):
        return
    _fire(fault)
    if fault.kind == "driver_exit":
        log.warning("inject_fault: the generation driver exits after %d committed unit(s)", units)
        logging.shutdown()
        os._exit(EXIT_CODE)
    until = fault.params["until"]
    with open(until + ".paused", "w") as f:
        f.write(f"{units}\n")
    deadline = time.monotonic() + 300
    while not os.path.exists(until):
        if time.monotonic() > deadline:
            raise TimeoutError(f"inject_fault driver_pause: {until} did not appear within 5 minutes")
        time.sleep(0.05)
