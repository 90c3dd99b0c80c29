"""The errors kdpipe raises for bad input: each names the key, file, sample or URI and says what
to do. The CLI turns a KdpipeError into its message and exit status 2; any other exception is a
bug in kdpipe or a library, and keeps its traceback (exit 1).

Each class also derives from the builtin error it refines (ValueError, FileNotFoundError, ...),
so callers that catch the builtin keep working.
"""

from __future__ import annotations


class KdpipeError(Exception):
    """Bad input or an unusable environment, explained to the user."""


class ConfigError(KdpipeError, ValueError):
    """A configuration key or value is wrong (a YAML file, a --set override, a flag)."""


class InputError(KdpipeError, ValueError):
    """The input dataset cannot be used as it is: a bad shard, sample, column or label."""


class CacheError(KdpipeError, ValueError):
    """The label cache is missing what a command needs, or holds something it must not use."""


class StorageError(KdpipeError, OSError):
    """Storage cannot be used: a missing object, denied access, a store that does not answer."""


class StorageMissing(StorageError, FileNotFoundError):
    """A file or object that must exist does not."""


class StorageDenied(StorageError, PermissionError):
    """The store refused access (credentials, bucket policy, file permissions)."""


class StorageUnreachable(StorageError, ConnectionError):
    """The store stopped answering; what was committed before is kept, a rerun finishes the job."""


class CacheMissing(CacheError, FileNotFoundError):
    """The label cache has no labels where a command needs them (no ref, no manifest): a
    CacheError that is also a FileNotFoundError, as it was before these classes."""


class ClusterUnreachable(KdpipeError, ConnectionError):
    """No Ray Jobs API answers at the address (or it refused us, or stopped answering)."""


def user_error(error: BaseException) -> KdpipeError | None:
    """The KdpipeError behind `error`, also when Ray carried it out of a task or a training
    worker (ray.exceptions.RayTaskError's `cause`, Ray Train's `worker_failures` and
    `controller_failure`, chained exceptions); None when there is none: a bug."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, KdpipeError) and not isinstance(cause, BaseException):
            return e
        failures = getattr(e, "worker_failures", None)
        todo += [cause if isinstance(cause, BaseException) else None, getattr(e, "controller_failure", None),
                 *(failures.values() if isinstance(failures, dict) else ()), e.__cause__, e.__context__]
    return None
