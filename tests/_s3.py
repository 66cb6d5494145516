"""A real S3 API for the tests: moto's server on a free local port, credentials required.

The session fixture :func:`s3` starts ``moto.server.ThreadedMotoServer`` on 127.0.0.1,
creates two IAM users through moto's own IAM API (``writer``: every S3 action; ``nobody``:
no policy at all, so every S3 call is denied), then switches moto's authentication on:
from then on every request must be signed with a valid access key, exactly as AWS
requires. Tests reach it through ``s3fs`` with ``storage_options`` (and child processes
through the ``ES_PIPE_TEST_S3`` environment variable, a JSON of those options). The
server is stopped at the end of the session (it is a thread of the test process: nothing
is left running). Without ``moto[server]`` or ``s3fs`` the tests are skipped, saying why.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

REGION = "us-east-1"
_ALL_S3 = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
}


@dataclass
class S3:
    """The running server: its endpoint and the storage options of each identity."""

    endpoint: str
    writer: dict[str, Any]
    nobody: dict[str, Any]
    buckets: list[str] = field(default_factory=list)

    def options(self, who: str = "writer") -> dict[str, Any]:
        """Fresh ``storage_options`` for s3fs (a deep copy: callers may change them)."""
        return json.loads(json.dumps(getattr(self, who)))

    def cli_options(self, who: str = "writer") -> list[str]:
        """The same as repeated ``--storage-option KEY=VALUE`` arguments."""
        o = self.options(who)
        return [
            "--storage-option",
            f"key={o['key']}",
            "--storage-option",
            f"secret={o['secret']}",
            "--storage-option",
            f"client_kwargs.endpoint_url={self.endpoint}",
            "--storage-option",
            f"client_kwargs.region_name={REGION}",
        ]

    def bucket(self) -> str:
        """A new, empty bucket (created with the writer's credentials)."""
        import boto3

        name = f"t-{uuid.uuid4().hex[:12]}"
        boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=self.writer["key"],
            aws_secret_access_key=self.writer["secret"],
        ).create_bucket(Bucket=name)
        self.buckets.append(name)
        return name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _set_auth(endpoint: str, count: str) -> None:
    """moto's switch: authenticate every request after ``count`` more (``inf``: never)."""
    request = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth",
        data=count.encode(),
        method="POST",
        headers={"Content-Type": "text/plain"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


@contextlib.contextmanager
def moto_s3() -> Iterator[S3]:
    """Start the server with its two users and authentication on; stop it on exit."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        iam = boto3.client(
            "iam",
            endpoint_url=endpoint,
            region_name=REGION,
            aws_access_key_id="setup",
            aws_secret_access_key="setup",
        )
        keys = {}
        for user in ("writer", "nobody"):
            iam.create_user(UserName=user)
            if user == "writer":
                iam.put_user_policy(
                    UserName=user, PolicyName="all-s3", PolicyDocument=json.dumps(_ALL_S3)
                )
            keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
        _set_auth(endpoint, "0")  # from now on, as on AWS: no valid signature, no access

        def options(user: str) -> dict[str, Any]:
            return {
                "key": keys[user]["AccessKeyId"],
                "secret": keys[user]["SecretAccessKey"],
                "client_kwargs": {"endpoint_url": endpoint, "region_name": REGION},
            }

        yield S3(endpoint, options("writer"), options("nobody"))
    finally:
        try:
            _set_auth(endpoint, "inf")
        finally:
            server.stop()
            thread = server._thread
            if thread is not None:  # nothing of the server outlives the session
                thread.join(timeout=10)
                assert not thread.is_alive(), "moto's server thread did not stop"


@pytest.fixture(scope="session")
def s3() -> Iterator[S3]:
    pytest.importorskip(
        "moto.server", reason="the S3 tests need moto[server]: pip install 'moto[server]>=5'"
    )
    pytest.importorskip("s3fs", reason="the S3 tests need s3fs: pip install s3fs")
    pytest.importorskip("boto3", reason="the S3 tests need boto3 (moto's dependency)")
    with moto_s3() as server:
        yield server
