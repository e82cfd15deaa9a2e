"""A real S3-protocol server (moto's standalone server) on 127.0.0.1, one per test worker.

``s3_endpoint`` (session) starts the server on a free loopback port and points the standard AWS
environment at it (dummy credentials, ``AWS_ENDPOINT_URL``, which botocore honours), so library
code, the CLI and child processes reach it with no custom configuration. ``s3_url`` gives each test
a fresh bucket and returns ``s3://<bucket>/run``.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator

import pytest

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in (*S3_ENV, "AWS_ENDPOINT_URL")}
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _ADMIN.pop(endpoint, None)
        server.stop()


_ADMIN: dict[str, object] = {}


def make_bucket(endpoint: str) -> str:
    """A fresh bucket; one client per server (creating a botocore client costs seconds)."""
    import s3fs

    fs = _ADMIN.get(endpoint)
    if fs is None:
        fs = _ADMIN[endpoint] = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True)
    name = f"ckpt-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)  # type: ignore[attr-defined]
    return name


@pytest.fixture
def s3_url(s3_endpoint: str) -> str:
    """``s3://<fresh bucket>/run`` on the loopback server."""
    return f"s3://{make_bucket(s3_endpoint)}/run"
