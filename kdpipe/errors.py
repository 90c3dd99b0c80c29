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
