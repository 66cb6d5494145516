"""Filesystems for URLs, with storage options, and storage errors that name their fix.

Every place es_pipe takes a URL (the sources, :class:`~es_pipe.sources.ShardList`,
:func:`~es_pipe.shard_writer.write_shards`, :class:`~es_pipe.Manifests`) also takes
``storage_options=``: the keyword arguments of the fsspec filesystem, exactly what
``fsspec.open(url, **storage_options)`` takes. For S3 (``s3fs``)::

    storage_options = {
        "key": "AKIA...",
        "secret": "...",
        "client_kwargs": {"endpoint_url": "http://minio:9000", "region_name": "us-east-1"},
    }

For S3, es_pipe lowers botocore's own retries to ``{"total_max_attempts": 2,
"mode": "standard"}`` (one retry) unless ``config_kwargs={"retries": ...}`` says
otherwise: botocore's default (5 tries, exponential backoff) takes about 9 s to report
an endpoint that cannot be reached, and es_pipe retries transient read and write errors
itself (:class:`~es_pipe.Retry`).

Without them, the backend's own configuration applies (for S3: ``AWS_*`` environment
variables, ``~/.aws``, instance roles; for GCS: application default credentials).

Options given to a source or shard list are also remembered for the shards' bucket
(``s3://bucket``), so that code that looks a shard up later without them (the sampler's
fingerprint of a shard, when it writes or checks its manifest) reaches it the same way.
Options passed explicitly always win.

:func:`storage_error` turns the errors of a misconfigured store (no credentials, invalid
credentials, access denied, a bucket that does not exist, an endpoint that cannot be
reached, a backend that is not installed) into a :class:`~es_pipe.errors.StorageError`
that names the fix. Such errors are configuration, not bad data: the sources raise them
even under ``on_error="skip"``, and es_pipe never retries them.
"""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import fsspec

from es_pipe.errors import ConfigError, ShardError, StorageError

__all__ = [
    "StorageError",
    "check_options",
    "options_for",
    "parse_option",
    "remember",
    "storage_error",
    "url_to_fs",
]

_LOCAL = ("", "file", "local")
S3_RETRIES = {"total_max_attempts": 2, "mode": "standard"}  # botocore's, under es_pipe's Retry
_remembered: dict[str, dict[str, Any]] = {}
_lock = threading.Lock()

_CREDENTIAL_ERRORS = frozenset(
    {
        "NoCredentialsError",
        "PartialCredentialsError",
        "CredentialRetrievalError",
        "NoAuthTokenError",
        "UnauthorizedSSOTokenError",
        "SSOTokenLoadError",
        "DefaultCredentialsError",  # google.auth
        "RefreshError",  # google.auth
        "ClientAuthenticationError",  # azure
    }
)
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
    }
)
_DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "AccountProblem", "403"})
_BUCKET_CODES = frozenset({"NoSuchBucket"})
_REGION_CODES = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed", "301"})
_ENDPOINT_ERRORS = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ClientConnectorError",  # aiohttp
        "ClientConnectorDNSError",
        "ServerDisconnectedError",
        "InvalidEndpointError",
        "gaierror",  # DNS
        "ConnectionRefusedError",
    }
)


def check_options(storage_options: Any) -> dict[str, Any] | None:
    """``storage_options`` as a plain dict (or ``None``), else a :class:`ConfigError`."""
    if storage_options is None:
        return None
    if not isinstance(storage_options, Mapping) or not all(
        isinstance(k, str) for k in storage_options
    ):
        raise ConfigError(
            f"storage_options={_cut(repr(storage_options))} must be a dict of fsspec "
            "filesystem arguments, e.g. {'key': ..., 'secret': ..., 'client_kwargs': "
            "{'endpoint_url': ...}} for S3"
        )
    return dict(storage_options)


def protocol_of(url: str) -> str:
    """The URL's protocol (``""`` for a local path)."""
    head, sep, _ = url.partition("://")
    return head.split("::")[-1] if sep else ""


def _bucket(url: str) -> str | None:
    """``proto://bucket`` of a remote URL, the key its remembered options go under."""
    proto = protocol_of(url)
    if proto in _LOCAL or "::" in url:
        return None
    rest = url.split("://", 1)[1]
    return f"{proto}://{rest.split('/', 1)[0]}"


def remember(urls: Iterable[str], storage_options: Mapping[str, Any] | None) -> None:
    """Remember ``storage_options`` for the buckets of ``urls`` (see the module docstring)."""
    if not storage_options:
        return
    opts = dict(storage_options)
    with _lock:
        for url in urls:
            bucket = _bucket(url)
            if bucket is not None:
                _remembered[bucket] = opts


def options_for(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options to open ``url`` with: the explicit ones, else the remembered ones of its
    bucket, else none (the backend's own configuration)."""
    if storage_options is not None:
        return dict(storage_options)
    bucket = _bucket(url)
    if bucket is None:
        return {}
    with _lock:
        return dict(_remembered.get(bucket, {}))


def url_to_fs(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """``fsspec.core.url_to_fs(url, **options)`` with :func:`options_for`'s options. A
    backend that is not installed is a :class:`StorageError` naming the package."""
    # deep copy: botocore rewrites nested dicts (config_kwargs["retries"]) in place
    options = copy.deepcopy(options_for(url, storage_options))
    if protocol_of(url) in ("s3", "s3a"):
        config = options.setdefault("config_kwargs", {})
        if isinstance(config, dict):
            config.setdefault("retries", dict(S3_RETRIES))
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
        return fs, str(path)
    except ImportError as exc:
        raise StorageError(
            f"cannot open {_cut(url)}: {exc}. Install the fsspec backend of its protocol "
            "(s3fs for s3://, gcsfs for gs://, adlfs for az://, aiohttp for http://)",
            kind="backend",
        ) from exc
    except TypeError as exc:  # an option the backend does not take
        raise ConfigError(
            f"storage_options for {_cut(url)} were refused by its filesystem: {exc}; pass "
            "only arguments that its fsspec filesystem takes"
        ) from exc


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)


def _code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        error = response.get("Error")
        if isinstance(error, Mapping) and error.get("Code") is not None:
            return str(error["Code"])
    return None


def _kind(exc: BaseException, url: str) -> tuple[str, BaseException] | None:
    remote = protocol_of(url) not in _LOCAL
    for e in _chain(exc):
        if isinstance(e, StorageError):
            return e.kind, e
        name, code = type(e).__name__, _code(e)
        if name in _CREDENTIAL_ERRORS or code in _CREDENTIAL_CODES:
            return "credentials", e
        if code in _BUCKET_CODES or (
            isinstance(e, FileNotFoundError) and "bucket does not exist" in str(e).lower()
        ):
            return "bucket", e
        if code in _DENIED_CODES:
            return "denied", e
        if code in _REGION_CODES:
            return "region", e
        if remote and name in _ENDPOINT_ERRORS:
            return "endpoint", e
        if remote and isinstance(e, TypeError) and "unexpected keyword argument" in str(e):
            return "options", e  # s3fs passes unknown options on to its session, lazily
    if remote:
        for e in _chain(exc):
            if isinstance(e, PermissionError):
                return "denied", e
    return None


def storage_error(exc: BaseException, url: str) -> StorageError | None:
    """A :class:`StorageError` naming the fix when ``exc`` (or an error it was raised
    from) is a storage configuration problem on the way to ``url``, else ``None``."""
    found = _kind(exc, url)
    if found is None:
        return None
    kind, cause = found
    if isinstance(cause, StorageError):
        return cause
    where = _cut(url)
    detail = f"{type(cause).__name__}: {_cut(str(cause), 300)}"
    bucket = _bucket(url) or url
    fixes = {
        "credentials": (
            f"no valid credentials for {where} ({detail}). Pass them with "
            "storage_options={'key': ..., 'secret': ...} (CLI: --storage-option key=... "
            "--storage-option secret=...), or set them up for the backend (for S3: "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE); for a public bucket "
            "pass storage_options={'anon': True}"
        ),
        "denied": (
            f"access to {where} was denied ({detail}): the credentials in use are invalid "
            f"or may not access {bucket}. Check the key and secret in storage_options (or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), and the bucket policy / IAM "
            "permissions (read for shards, read and write for manifests)"
        ),
        "bucket": (
            f"bucket {bucket} of {where} does not exist ({detail}): check the bucket name, "
            "and that the endpoint is the one that holds it (storage_options={'client_kwargs': "
            "{'endpoint_url': ...}}, CLI: --storage-option client_kwargs.endpoint_url=...); "
            "es_pipe does not create buckets"
        ),
        "region": (
            f"{where} is in another region than the client's ({detail}): pass "
            "storage_options={'client_kwargs': {'region_name': ...}} with the bucket's region"
        ),
        "endpoint": (
            f"cannot reach the storage endpoint of {where} ({detail}): check the endpoint "
            "URL (storage_options={'client_kwargs': {'endpoint_url': ...}}, CLI: "
            "--storage-option client_kwargs.endpoint_url=..., or AWS_ENDPOINT_URL), the "
            "network and any proxy. To fail faster, lower the client's retries, e.g. "
            "storage_options={'config_kwargs': {'retries': {'max_attempts': 2}}}"
        ),
        "options": (
            f"the filesystem of {where} refused a storage option ({detail}): pass only "
            "arguments that its fsspec filesystem takes in storage_options (CLI: "
            "--storage-option KEY=VALUE), e.g. for S3 key, secret, anon, client_kwargs, "
            "config_kwargs"
        ),
    }
    return StorageError(fixes[kind], kind=kind)


def raise_storage_error(exc: BaseException, url: str) -> None:
    """Raise :func:`storage_error`'s error (from ``exc``) if there is one; else return."""
    error = storage_error(exc, url)
    if error is not None:
        if error is exc:
            raise error
        raise error from exc


@contextlib.contextmanager
def named_errors(url: str, *, missing: str | None = None) -> Iterator[None]:
    """Run the block on ``url``'s storage; an error it raises that is a storage
    misconfiguration leaves as :func:`storage_error`'s error (from it). Else, with
    ``missing`` given, a ``FileNotFoundError`` leaves as ``ShardError(missing)``; anything
    else leaves unchanged. The one place the ``try``/``raise_storage_error`` pattern of
    every storage call is written."""
    try:
        yield
    except Exception as exc:
        raise_storage_error(exc, url)
        if missing is not None and isinstance(exc, FileNotFoundError):
            raise ShardError(missing) from exc
        raise


def parse_option(text: str) -> tuple[list[str], Any]:
    """Parse one CLI ``KEY=VALUE`` storage option: ``KEY`` may be dotted
    (``client_kwargs.endpoint_url``) for nested options; ``VALUE`` is JSON where it parses
    (``true``, ``3``, ``{"a": 1}``), else the text as written."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
        raise ConfigError(
            f"--storage-option {text!r}: expected KEY=VALUE, e.g. "
            "client_kwargs.endpoint_url=http://localhost:9000 or anon=true"
        )
    try:
        parsed: Any = json.loads(value)
    except ValueError:
        parsed = value
    return key.strip().split("."), parsed


def options_from_cli(items: Iterable[str] | None) -> dict[str, Any] | None:
    """The storage options of repeated ``--storage-option KEY=VALUE`` arguments."""
    options: dict[str, Any] = {}
    for text in items or ():
        path, value = parse_option(text)
        node = options
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--storage-option {text!r}: {part!r} is already a value")
            node = child
        node[path[-1]] = value
    return options or None


def add_storage_argument(parser: Any) -> None:
    """Add the repeatable ``--storage-option KEY=VALUE`` to an argparse parser."""
    parser.add_argument(
        "--storage-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="an fsspec storage option for remote URLs, repeatable; dotted keys nest and "
        "values are JSON where they parse, e.g. --storage-option key=AKIA... "
        "--storage-option secret=... --storage-option "
        "client_kwargs.endpoint_url=http://localhost:9000 (or anon=true)",
    )


def _cut(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
