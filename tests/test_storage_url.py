"""Replica URL parsing (spec 2.6, Litestream's s3 factory) and redaction of secrets."""

from __future__ import annotations

from pathlib import Path

import pytest

from ltxvfs.errors import ReplicaURLError
from ltxvfs.storage import FileReplicaClient, open_replica
from ltxvfs.storage.url import (
    MIN_PART_SIZE,
    ensure_endpoint_scheme,
    is_local_endpoint,
    parse_replica_url,
    redact_url,
)

SSE_KEY = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI="  # base64 of 32 bytes


def parse(url: str, **env: str):
    return parse_replica_url(url, environ=env)


# (url, bucket, prefix, region, endpoint, force_path_style)
HOST_CASES = [
    ("s3://mybucket/db", "mybucket", "db", "", "", False),
    ("s3://mybucket/a/b/../c/", "mybucket", "a/c", "", "", False),
    ("s3://mybucket//db//x", "mybucket", "db/x", "", "", False),
    ("s3://mybucket/my%20db", "mybucket", "my db", "", "", False),
    ("s3://mybucket.s3.amazonaws.com/db", "mybucket", "db", "", "", False),
    ("s3://mybucket.s3.eu-west-1.amazonaws.com/db", "mybucket", "db", "eu-west-1", "", False),
    ("s3://mybucket.nyc3.digitaloceanspaces.com/db", "mybucket", "db", "nyc3",
     "https://nyc3.digitaloceanspaces.com", False),
    ("s3://mybucket.s3.us-west-002.backblazeb2.com/db", "mybucket", "db", "us-west-002",
     "https://s3.us-west-002.backblazeb2.com", True),
    ("s3://mybucket.s3.filebase.com/db", "mybucket", "db", "", "https://s3.filebase.com", True),
    ("s3://mybucket.s3.fr-par.scw.cloud/db", "mybucket", "db", "fr-par",
     "https://s3.fr-par.scw.cloud", False),
    ("s3://mybucket.localhost:9000/db", "mybucket", "db", "us-east-1",
     "http://localhost:9000", True),
    ("s3://mybucket.minio.internal:9000/db", "mybucket", "db", "us-east-1",
     "http://minio.internal:9000", True),
    ("s3://user:pw@mybucket/db", "mybucket", "db", "", "", False),
    ("s3://arn:aws:s3:us-west-2:123456789012:accesspoint/myap/prod/db",
     "arn:aws:s3:us-west-2:123456789012:accesspoint/myap", "prod/db", "us-west-2", "", False),
]


@pytest.mark.parametrize(("url", "bucket", "prefix", "region", "endpoint", "path_style"),
                         HOST_CASES)
def test_s3_host_rules(url, bucket, prefix, region, endpoint, path_style):
    u = parse(url)
    assert (u.scheme, u.bucket, u.prefix, u.region, u.endpoint, u.force_path_style) == (
        "s3", bucket, prefix, region, endpoint, path_style)


@pytest.mark.parametrize(("endpoint", "expected"), [
    ("localhost:9000", "http://localhost:9000"),
    ("127.0.0.1:9000", "http://127.0.0.1:9000"),
    ("10.1.2.3", "http://10.1.2.3"),
    ("192.168.0.5:9000", "http://192.168.0.5:9000"),
    ("172.16.0.1:9000", "http://172.16.0.1:9000"),
    ("172.31.255.1", "http://172.31.255.1"),
    ("minio.local:9000", "http://minio.local:9000"),
    ("s3.dev.localhost", "http://s3.dev.localhost"),
    ("[::1]:9000", "http://[::1]:9000"),
    ("172.32.0.1", "https://172.32.0.1"),
    ("172.2.0.1", "https://172.2.0.1"),
    ("s3.example.com", "https://s3.example.com"),
    ("fly.storage.tigris.dev", "https://fly.storage.tigris.dev"),
    ("http://s3.example.com", "http://s3.example.com"),
    ("https://localhost:9000", "https://localhost:9000"),
])
def test_endpoint_scheme(endpoint, expected):
    assert ensure_endpoint_scheme(endpoint) == expected
    u = parse(f"s3://bkt/db?endpoint={endpoint}")
    assert u.endpoint == expected
    assert u.force_path_style is True  # an explicit endpoint implies path style


def test_local_endpoint_detection():
    assert is_local_endpoint("http://localhost:9000")
    assert not is_local_endpoint("https://example.com:9000")
    assert not is_local_endpoint("notlocalhost")


@pytest.mark.parametrize(("query", "expected"), [
    ("endpoint=localhost:9000&forcePathStyle=false", False),
    ("endpoint=localhost:9000&force-path-style=NO", False),
    ("endpoint=localhost:9000&forcePathStyle=", True),  # empty value = not set
    ("forcePathStyle=true", True),
    ("force-path-style=1", True),
    ("forcePathStyle=f", False),
    ("", False),
])
def test_force_path_style(query, expected):
    assert parse(f"s3://bkt/db?{query}").force_path_style is expected


def test_query_region_overrides_host():
    assert parse("s3://b.s3.eu-west-1.amazonaws.com/db?region=us-west-2").region == "us-west-2"


@pytest.mark.parametrize(("raw", "expected"), [
    ("true", True), ("TRUE", True), ("1", True), ("t", True), ("Yes", True),
    ("false", False), ("0", False), ("F", False), ("no", False),
])
def test_booleans(raw, expected):
    u = parse(f"s3://bkt/db?skipVerify={raw}&sign-payload={raw}&requireContentMD5={raw}")
    assert (u.skip_verify, u.sign_payload, u.require_content_md5) == (expected,) * 3
    assert parse(f"s3://bkt/db?skip-verify={raw}").skip_verify is expected


def test_defaults_and_other_params():
    u = parse("s3://bkt/db")
    assert (u.skip_verify, u.sign_payload, u.require_content_md5) == (False, True, True)
    assert (u.concurrency, u.part_size, u.storage_class) == (None, MIN_PART_SIZE, "")
    u = parse("s3://bkt/db?concurrency=4&part-size=10485760&storage-class=STANDARD_IA"
              "&sseKmsKeyId=alias/x")
    assert (u.concurrency, u.part_size, u.storage_class, u.sse_kms_key_id) == (
        4, 10 * 1024 * 1024, "STANDARD_IA", "alias/x")
    assert parse("s3://bkt/db?partSize=6000000&storageClass=GLACIER_IR").part_size == 6000000


def test_provider_defaults():
    tigris = parse("s3://bkt/db?endpoint=fly.storage.tigris.dev")
    assert tigris.require_content_md5 is False and tigris.is_tigris
    assert parse("s3://bkt/db?endpoint=x.r2.cloudflarestorage.com").concurrency == 2
    assert parse("s3://bkt/db?endpoint=x.r2.cloudflarestorage.com&concurrency=7").concurrency == 7
    assert parse("s3://bkt/db?endpoint=fly.storage.tigris.dev&requireContentMD5=true"
                 ).require_content_md5 is True


def test_env_endpoint_fallback():
    u = parse("s3://bkt/db", LITESTREAM_S3_ENDPOINT="localhost:9000")
    assert (u.endpoint, u.force_path_style) == ("http://localhost:9000", True)
    u = parse("s3://bkt/db?forcePathStyle=false", LITESTREAM_S3_ENDPOINT="s3.example.com")
    assert (u.endpoint, u.force_path_style) == ("https://s3.example.com", False)
    # Only a fallback: a query or host endpoint wins.
    u = parse("s3://bkt/db?endpoint=127.0.0.1:1", LITESTREAM_S3_ENDPOINT="localhost:9000")
    assert u.endpoint == "http://127.0.0.1:1"
    u = parse("s3://bkt.localhost:9000/db", LITESTREAM_S3_ENDPOINT="s3.example.com")
    assert u.endpoint == "http://localhost:9000"


def test_sse_customer_key():
    u = parse(f"s3://bkt/db?sseCustomerKey={SSE_KEY}")
    assert u.sse_customer_algorithm == "AES256"
    assert u.sse_customer_key == SSE_KEY and len(u.sse_customer_key_md5) == 24
    assert SSE_KEY not in repr(u) and SSE_KEY not in u.url
    assert parse(f"s3://bkt/db?sse-customer-key={SSE_KEY}").sse_customer_key == SSE_KEY


@pytest.mark.parametrize(("url", "problem"), [
    ("", "empty"),
    ("s3://bkt", "path is required"),
    ("s3://bkt/", "path is required"),
    ("s3://bkt/..", "path is required"),
    ("s3:///db", "bucket"),
    ("s3://localhost:9000/db", "bucket"),
    ("gs://bkt/db", "unsupported scheme 'gs'"),
    ("relative/dir", "scheme"),
    ("file://server/share/db", "no host"),
    ("file:relative/db", "absolute"),
    ("file:///", "'/'"),
    ("s3://[::1/db", "cannot parse"),
    ("s3://bkt/db?skipVerify=maybe", "skipVerify='maybe' is not a boolean"),
    ("s3://bkt/db?force-path-style=2", "not a boolean"),
    ("s3://bkt/db?concurrency=abc", "positive integer"),
    ("s3://bkt/db?concurrency=0", "positive integer"),
    ("s3://bkt/db?partSize=-5", "positive integer"),
    ("s3://bkt/db?partSize=1024", "at least 5242880"),
    ("s3://arn:aws:s3:us-east-1:1:bucket/db", "access point"),
    ("s3://bkt/db?sseCustomerKey=bm90LWJhc2U2NA&x=1", "base64"),
    ("s3://bkt/db?sseCustomerKey=c2hvcnQ=", "32 bytes"),
    (f"s3://bkt/db?sseCustomerKey={SSE_KEY}&sseKmsKeyId=k", "mutually exclusive"),
    (f"s3://bkt/db?sseCustomerKey={SSE_KEY}&sseCustomerAlgorithm=DES", "AES256"),
    (f"s3://bkt/db?sseCustomerKey={SSE_KEY}&endpoint=http://s3.example.com", "https"),
])
def test_bad_urls(url, problem):
    with pytest.raises(ReplicaURLError) as info:
        parse(url)
    assert problem in str(info.value)
    assert isinstance(info.value, ValueError)


def test_error_messages_never_contain_secrets():
    secret = "hunter2-TOPSECRET"
    for url in (f"s3://user:{secret}@bkt?sseCustomerKey={secret}",
                f"s3://bkt/db?sse-customer-key={secret}&skipVerify=maybe",
                f"gs://u:{secret}@bkt/db?token={secret}"):
        with pytest.raises(ReplicaURLError) as info:
            parse(url)
        assert secret not in str(info.value)
        assert "REDACTED" in str(info.value)


@pytest.mark.parametrize(("url", "expected"), [
    ("s3://bkt/db?endpoint=localhost&region=x", "s3://bkt/db?endpoint=localhost&region=x"),
    ("s3://u:pw@bkt/db", "s3://u:REDACTED@bkt/db"),
    ("s3://u@bkt/db", "s3://u@bkt/db"),
    ("s3://bkt/db?sseCustomerKey=abc&region=x", "s3://bkt/db?sseCustomerKey=REDACTED&region=x"),
    ("s3://bkt/db?sse-customer-key-md5=abc", "s3://bkt/db?sse-customer-key-md5=REDACTED"),
    ("s3://bkt/db?X-Amz-Security-Token=t&X-Amz-Signature=s&aws_secret=z&Password=p",
     "s3://bkt/db?X-Amz-Security-Token=REDACTED&X-Amz-Signature=REDACTED"
     "&aws_secret=REDACTED&Password=REDACTED"),
    ("s3://bkt/db?sseCustomerK%65y=abc", "s3://bkt/db?sseCustomerK%65y=REDACTED"),
    ("s3://[::1/db?token=abc", "s3://[::1/db?token=REDACTED"),
    ("/plain/path", "/plain/path"),
])
def test_redact_url(url, expected):
    assert redact_url(url) == expected


def test_file_urls(tmp_path):
    u = parse(tmp_path.as_uri())
    assert (u.scheme, u.path) == ("file", tmp_path)
    assert parse("file:///srv/my%20replica/").path == Path("/srv/my replica")
    assert parse("file://localhost/srv/x").path == Path("/srv/x")
    assert parse("/srv/a/../b").path == Path("/srv/b")
    assert parse("/srv/b").url == "file:///srv/b"


def test_open_replica_dispatch(tmp_path):
    client = open_replica(str(tmp_path))
    assert isinstance(client, FileReplicaClient) and client.root == tmp_path
    assert isinstance(open_replica(tmp_path.as_uri()), FileReplicaClient)
    with pytest.raises(ReplicaURLError, match="unsupported scheme 'webdav'"):
        open_replica("webdav://host/db")
