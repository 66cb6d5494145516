"""The errors es_pipe raises. Every message names what was wrong and how to fix it."""


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


class ManifestStorageError(ManifestError, OSError):
    """The manifest storage refused a write (a full disk, a quota, a read-only
    filesystem): the commit did not happen, the previous epoch stays committed."""
