"""The errors es_pipe raises. Every message names what was wrong and how to fix it."""

from typing import Any


class EsPipeError(Exception):
    """Base class of every error es_pipe raises on purpose."""


class ConfigError(EsPipeError, ValueError):
    """An invalid argument or hyper-parameter."""


class FeedbackError(EsPipeError, ValueError):
    """Losses fed back to the stage that break the feedback contract."""


class ShardError(EsPipeError):
    """A shard that is missing, unreadable, corrupt or inconsistent."""


class ManifestError(EsPipeError):
    """A manifest that is missing, corrupt, uncommitted or does not match its shard."""


class StorageError(EsPipeError):
    """Storage that cannot be reached as configured: no or invalid credentials, access
    denied, a bucket that does not exist, an unreachable endpoint, a missing fsspec
    backend. Configuration, not bad data: raised even under ``on_error="skip"``, never
    retried. ``kind`` is one of ``"credentials"``, ``"denied"``, ``"bucket"``,
    ``"region"``, ``"endpoint"``, ``"backend"``, ``"options"`` (a storage option the
    filesystem refused)."""

    def __init__(self, message: str, *, kind: str = "storage") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(
        self,
    ) -> tuple[Any, tuple[str, str]]:  # picklable across DataLoader workers with its kind
        return (_storage_error, (str(self), self.kind))


def _storage_error(message: str, kind: str) -> StorageError:
    return StorageError(message, kind=kind)


class ManifestStorageError(ManifestError, OSError):
    """The manifest storage refused a write (a full disk, a quota, a read-only
    filesystem): the commit did not happen, the previous epoch stays committed."""
