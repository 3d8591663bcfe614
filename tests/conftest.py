"""Shared fixtures: a real HTTP S3 endpoint (moto's server) on 127.0.0.1, and bucket/replica helpers.

The S3 endpoint is session-wide (starting moto costs about a second); each test gets its own bucket
or prefix, so tests never see each other's objects.
"""

from __future__ import annotations

import os
import socket
import uuid

import boto3
import pytest
from moto.server import ThreadedMotoServer

pytest_plugins = ["litestream_rig"]

#: SQLAlchemy's compliance suite runs in a subprocess of its own (tests/test_sqlalchemy.py).
#: So does the Django project's (tests/test_django.py runs Django's test runner on it).
collect_ignore = ["sqlalchemy_suite", "django_project"]

# Fake credentials for moto; real ones must never be needed or leaked by the test suite.
TEST_ACCESS_KEY = "testing-access-key"
TEST_SECRET_KEY = "testing-secret-key-do-not-log"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _no_replica_outlives_its_test():
    """Read-mode replicas linger after their last connection (vfs.LINGER) so that the next open
    reuses their cache: between tests that would let one test warm another's cache, or impose
    its settings. Each test starts with none lingering."""
    yield
    from ltxvfs import registry

    for vfs in list(registry._registered.values()):
        vfs.expire_lingering()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1; yields its endpoint URL (``http://127.0.0.1:<port>``)."""
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in
             ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED")}
    os.environ["AWS_ACCESS_KEY_ID"] = TEST_ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = TEST_SECRET_KEY
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def s3_admin(s3_server):
    """A plain boto3 client on the test endpoint, for arranging and inspecting buckets."""
    return boto3.client(
        "s3", endpoint_url=s3_server, region_name="us-east-1",
        aws_access_key_id=TEST_ACCESS_KEY, aws_secret_access_key=TEST_SECRET_KEY,
    )


@pytest.fixture
def bucket(s3_admin):
    """A fresh, empty bucket for one test."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_admin.create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_url(s3_server, bucket):
    """Replica URL of an empty replica in a fresh bucket on the test endpoint."""
    return f"s3://{bucket}/db?endpoint={s3_server}&region=us-east-1"


@pytest.fixture
def file_url(tmp_path):
    """Replica URL of an empty ``file://`` replica."""
    return (tmp_path / "replica").as_uri()
