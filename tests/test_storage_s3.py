"""The S3 replica client against moto's HTTP server: Litestream's key layout, metadata, ranged
reads, pagination, conditional writes and error mapping."""

from __future__ import annotations

import io
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import boto3
import pytest
import requests
from botocore.exceptions import BotoCoreError, ClientError
from botocore.stub import Stubber
from conftest import TEST_SECRET_KEY
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends

from ltxvfs.errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ObjectExistsError,
    ObjectNotFoundError,
    StorageError,
)
from ltxvfs.storage import FileInfo, open_replica
from ltxvfs.storage.s3 import (
    METADATA_KEY,
    S3ReplicaClient,
    bucket_region,
    format_timestamp,
    parse_timestamp,
    resolve_credentials,
)

TS = 1_700_000_000_000  # 2023-11-14T22:13:20Z
SSE_KEY = "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI="


def key(level: int, lo: int, hi: int, prefix: str = "db") -> str:
    return f"{prefix}/{level:04x}/{lo:016x}-{hi:016x}.ltx"


def keys_in(s3_admin, bucket: str) -> list[str]:
    return [o["Key"] for o in s3_admin.list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.fixture
def client(s3_url):
    c = open_replica(s3_url)
    assert isinstance(c, S3ReplicaClient)
    yield c
    c.close()


def test_round_trip_layout_and_ranges(client, s3_admin, bucket):
    data = bytes(range(256)) * 40
    i1 = client.write(0, 1, 1, data, TS)
    client.write(0, 2, 2, b"second", TS + 1)
    client.write(9, 1, 2, io.BytesIO(b"snapshot"), TS + 2)
    assert i1 == FileInfo(0, 1, 1, len(data), datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC))
    assert keys_in(s3_admin, bucket) == [
        "db/0000/0000000000000001-0000000000000001.ltx",
        "db/0000/0000000000000002-0000000000000002.ltx",
        "db/0009/0000000000000001-0000000000000002.ltx",
    ]
    files = client.list_files(0)
    assert [(f.level, f.min_txid, f.max_txid, f.size) for f in files] == [
        (0, 1, 1, len(data)), (0, 2, 2, 6)]
    now = datetime.now(UTC)
    assert all(f.created_at.tzinfo is not None and abs(f.created_at - now) < timedelta(minutes=5)
               for f in files)
    assert client.read(0, 1, 1) == data
    assert client.read(0, 1, 1, 100, 28) == data[100:128]
    assert client.read(0, 1, 1, len(data) - 24) == data[-24:]
    assert client.read(0, 1, 1, len(data) - 4, 100) == data[-4:]  # short read at the end
    assert client.read(0, 1, 1, len(data) + 10) == b""
    assert client.read(0, 1, 1, 5, 0) == b""
    assert client.read(9, 1, 2) == b"snapshot"

    client.delete(files + [FileInfo(0, 7, 7, 0, now)])  # a missing one is ignored
    assert client.list_files(0) == []
    assert keys_in(s3_admin, bucket) == ["db/0009/0000000000000001-0000000000000002.ltx"]


@pytest.mark.parametrize(("ms", "text"), [
    (TS, "2023-11-14T22:13:20Z"),
    (TS + 123, "2023-11-14T22:13:20.123Z"),
    (TS + 100, "2023-11-14T22:13:20.1Z"),
    (TS + 120, "2023-11-14T22:13:20.12Z"),
    (0, "1970-01-01T00:00:00Z"),
])
def test_timestamp_format_is_go_rfc3339nano(ms, text):
    assert format_timestamp(ms) == text
    assert parse_timestamp(text) == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


def test_parse_timestamp_variants():
    assert parse_timestamp("2023-11-14T22:13:20.123456789Z") == datetime(
        2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    assert parse_timestamp("2023-11-14T23:13:20+01:00") == datetime(
        2023, 11, 14, 22, 13, 20, tzinfo=UTC)
    assert parse_timestamp("yesterday") is None
    assert parse_timestamp("2023-13-14T22:13:20Z") is None


def test_metadata_header_value(client, s3_admin, bucket):
    client.write(0, 1, 1, b"x", TS + 120)
    head = s3_admin.head_object(Bucket=bucket, Key=key(0, 1, 1))
    assert head["Metadata"] == {METADATA_KEY: "2023-11-14T22:13:20.12Z"}


def test_list_with_metadata_timestamps(client, s3_admin, bucket):
    client.write(0, 1, 1, b"a", TS)
    client.write(0, 2, 2, b"b", TS + 5)
    s3_admin.put_object(Bucket=bucket, Key=key(0, 3, 3), Body=b"foreign")  # no metadata
    s3_admin.put_object(Bucket=bucket, Key=key(0, 4, 4), Body=b"bad",
                        Metadata={METADATA_KEY: "not a time"})
    plain = client.list_files(0)
    meta = client.list_files(0, use_metadata=True)
    assert [f.created_at.year for f in plain] == [datetime.now(UTC).year] * 4
    assert [f.created_at for f in meta[:2]] == [
        datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC),
        datetime(2023, 11, 14, 22, 13, 20, 5000, tzinfo=UTC)]
    assert meta[2:] == plain[2:]  # falls back to LastModified
    assert client.list_files(0, seek=2, use_metadata=True) == meta[1:]


def test_seek_and_foreign_keys_skipped(client, s3_admin, bucket):
    for lo in (1, 2, 5):
        client.write(0, lo, lo, b"x", TS)
    for k in ("db/0000/notes.txt", "db/0000/sub/0000000000000003-0000000000000003.ltx",
              "db/0000/0000000000000004-0000000000000003.ltx", "dbx/0000/" + key(0, 6, 6)[8:],
              "db/0001/" + key(0, 7, 7)[8:]):
        s3_admin.put_object(Bucket=bucket, Key=k, Body=b"junk")
    assert [f.min_txid for f in client.list_files(0)] == [1, 2, 5]
    assert [f.min_txid for f in client.list_files(0, seek=2)] == [2, 5]
    assert client.list_files(0, seek=6) == []
    assert [f.min_txid for f in client.list_files(1)] == [7]


def test_pagination_over_1000_and_batched_delete(client, bucket):
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    n = 1001
    for i in range(1, n + 1):  # straight into moto: 1001 HTTP PUTs would take seconds
        backend.put_object(bucket, key(1, i, i), b"x")
    files = client.list_files(1)
    assert [f.min_txid for f in files] == list(range(1, n + 1))
    assert client.requests["LIST"] == 2
    client.delete(files)
    assert client.requests["DELETE"] == 2
    assert client.list_files(1) == []


def test_parallel_ranged_reads_share_one_client(client):
    data = os.urandom(32 * 1024)
    client.write(9, 1, 1, data, TS)
    ranges = [(i * 1024, 1024) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        chunks = list(pool.map(lambda r: client.read(9, 1, 1, *r), ranges))
    assert b"".join(chunks) == data
    assert client.requests["GET"] == 32


def test_small_pages(s3_url):
    with S3ReplicaClient(s3_url, list_page_size=3) as c:
        for lo in range(1, 8):
            c.write(0, lo, lo, b"x", TS)
        assert [f.min_txid for f in c.list_files(0)] == list(range(1, 8))
        assert c.requests.snapshot() == {"GET": 0, "PUT": 7, "LIST": 3, "HEAD": 0, "DELETE": 0}


def test_request_counter(client):
    client.write(0, 1, 1, b"abc", TS)
    client.read(0, 1, 1, 0, 1)
    client.read(0, 1, 1, 1)
    client.list_files(0, use_metadata=True)
    client.check()
    client.delete(client.list_files(0))
    assert client.requests.snapshot() == {"GET": 2, "PUT": 1, "LIST": 2, "HEAD": 2, "DELETE": 1}
    client.requests.reset()
    assert client.requests["GET"] == 0


def test_exclusive_write_conflict(client, s3_admin, bucket):
    client.write(0, 1, 1, b"original", TS, exclusive=True)
    with pytest.raises(ObjectExistsError) as info:
        client.write(0, 1, 1, b"intruder", TS + 1, exclusive=True)
    assert key(0, 1, 1) in str(info.value) and client.url in str(info.value)
    assert client.read(0, 1, 1) == b"original"
    head = s3_admin.head_object(Bucket=bucket, Key=key(0, 1, 1))
    assert head["Metadata"][METADATA_KEY] == "2023-11-14T22:13:20Z"
    client.write(0, 1, 1, b"overwrite", TS + 2)  # not exclusive: replaces
    assert client.read(0, 1, 1) == b"overwrite"


@pytest.fixture
def small_parts(monkeypatch):
    """Let moto accept tiny multipart parts so the multipart path is tested with KiBs, not MiBs."""
    import moto.s3.models

    monkeypatch.setattr(moto.s3.models, "S3_UPLOAD_PART_MIN_SIZE", 256)


def test_multipart_upload(s3_url, s3_admin, bucket, small_parts, tmp_path):
    payload = os.urandom(5000)
    src = tmp_path / "big.ltx"
    src.write_bytes(payload)
    with S3ReplicaClient(s3_url, part_size=1024) as c, open(src, "rb") as f:
        info = c.write(9, 1, 9, f, TS)
        assert info.size == 5000
        assert c.read(9, 1, 9) == payload
        assert c.requests["PUT"] == 1 + 5 + 1  # create, 5 parts, complete
        head = s3_admin.head_object(Bucket=bucket, Key=key(9, 1, 9))
        assert head["ETag"].endswith('-5"')
        assert head["Metadata"] == {METADATA_KEY: "2023-11-14T22:13:20Z"}

        c.write(9, 1, 10, payload[:3000], TS, exclusive=True)  # bytes, multipart, new key
        assert c.read(9, 1, 10) == payload[:3000]
        with pytest.raises(ObjectExistsError, match=key(9, 1, 9)):
            c.write(9, 1, 9, b"y" * 3000, TS + 1, exclusive=True)
    assert s3_admin.get_object(Bucket=bucket, Key=key(9, 1, 9))["Body"].read() == payload
    assert s3_admin.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_missing_bucket(s3_server):
    url = (f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/db?endpoint={s3_server}"
           f"&sseCustomerKey={SSE_KEY}")
    with S3ReplicaClient(url) as c:
        for call in (c.check, lambda: c.list_files(0), lambda: c.read(0, 1, 1)):
            with pytest.raises(BucketNotFoundError) as info:
                call()
            assert c.url in str(info.value)
            assert SSE_KEY not in str(info.value)


def test_missing_key(client):
    with pytest.raises(ObjectNotFoundError) as info:
        client.read(0, 3, 4, 0, 100)
    assert key(0, 3, 4) in str(info.value) and client.url in str(info.value)


def test_check_ok(client):
    client.check()


@pytest.fixture
def moto_auth(s3_server):
    """Make moto check signatures and IAM permissions, for this test only."""
    iam = boto3.client("iam", endpoint_url=s3_server, region_name="us-east-1")
    user = f"u-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    access = iam.create_access_key(UserName=user)["AccessKey"]
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        yield access["AccessKeyId"], access["SecretAccessKey"]
    finally:
        requests.post(f"{s3_server}/moto-api/reset-auth", data=b"inf", timeout=10)


@pytest.mark.parametrize("case", ["unknown key", "wrong secret", "no permission"])
def test_access_denied(s3_url, moto_auth, case):
    key_id, secret = moto_auth
    env = {"unknown key": {"AWS_ACCESS_KEY_ID": "AKIAUNKNOWN", "AWS_SECRET_ACCESS_KEY": "x"},
           "wrong secret": {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": "wrong-secret"},
           "no permission": {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}}[case]
    with S3ReplicaClient(s3_url, environ=env) as c:
        for call in (c.check, lambda: c.list_files(0), lambda: c.write(0, 1, 1, b"x", TS)):
            with pytest.raises(AccessDeniedError) as info:
                call()
            text = str(info.value)
            assert c.url in text
            assert secret not in text and "wrong-secret" not in text
            assert TEST_SECRET_KEY not in text


def stubbed(client: S3ReplicaClient) -> Stubber:
    return Stubber(client._s3)  # the lazily created boto3 client


@pytest.mark.parametrize(("code", "status", "expected"), [
    ("AccessDenied", 403, AccessDeniedError),
    ("SignatureDoesNotMatch", 403, AccessDeniedError),
    ("NoSuchKey", 404, ObjectNotFoundError),
    ("NoSuchBucket", 404, BucketNotFoundError),
    ("InternalError", 500, StorageError),
    ("SlowDown", 503, StorageError),
])
def test_error_mapping_stubbed(code, status, expected):
    c = S3ReplicaClient("s3://bkt/db?endpoint=127.0.0.1:1")
    with stubbed(c) as stub:
        stub.add_client_error("get_object", service_error_code=code, http_status_code=status)
        with pytest.raises(expected) as info:
            c.read(0, 1, 1)
    assert type(info.value) is expected
    assert isinstance(info.value.__cause__, ClientError)
    assert key(0, 1, 1) in str(info.value)


def test_concurrent_conditional_write_maps_to_exists():
    c = S3ReplicaClient("s3://bkt/db?endpoint=127.0.0.1:1")
    with stubbed(c) as stub:
        stub.add_client_error("put_object", service_error_code="ConditionalRequestConflict",
                              http_status_code=409)
        with pytest.raises(ObjectExistsError,
                           match=r"the object already exists \(ConditionalRequestConflict\)"):
            c.write(0, 1, 1, b"x", TS, exclusive=True)


def test_open_replica_makes_no_request():
    c = open_replica("s3://bkt/db?endpoint=127.0.0.1:1&sseCustomerKey=" + SSE_KEY)
    assert isinstance(c, S3ReplicaClient)
    assert c.url == "s3://bkt/db?endpoint=127.0.0.1:1&sseCustomerKey=REDACTED"
    assert c.requests.snapshot() == dict.fromkeys(c.requests.KINDS, 0)
    c.close()


def test_unreachable_endpoint():
    url = "s3://bkt/db?endpoint=127.0.0.1:1"  # nothing listens on port 1
    with S3ReplicaClient(url, max_attempts=1, connect_timeout=2) as c:
        with pytest.raises(StorageError) as info:
            c.list_files(0)
    assert type(info.value) is StorageError
    assert isinstance(info.value.__cause__, BotoCoreError)
    assert url in str(info.value)


def test_delete_sends_content_md5(client):
    client.write(0, 1, 1, b"x", TS)
    seen: list[dict[str, str]] = []
    client._s3.meta.events.register("before-send.s3.DeleteObjects",
                                    lambda request, **_: seen.append(dict(request.headers)))
    client.delete(client.list_files(0))
    assert len(seen) == 1 and len(seen[0]["Content-MD5"]) == 24


def test_credentials_resolution():
    assert resolve_credentials({}) is None
    assert resolve_credentials({"AWS_ACCESS_KEY_ID": "a"}) is None
    both = {"LITESTREAM_ACCESS_KEY_ID": "l", "LITESTREAM_SECRET_ACCESS_KEY": "m",
            "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    assert resolve_credentials(both) == ("a", "b")
    assert resolve_credentials({"LITESTREAM_ACCESS_KEY_ID": "l",
                                "LITESTREAM_SECRET_ACCESS_KEY": "m"}) == ("l", "m")
    assert resolve_credentials({"AWS_ACCESS_KEY_ID": "a",
                                "LITESTREAM_SECRET_ACCESS_KEY": "m"}) == ("a", "m")


def test_litestream_credentials_are_used(s3_url):
    env = {"LITESTREAM_ACCESS_KEY_ID": "lk", "LITESTREAM_SECRET_ACCESS_KEY": "ls"}
    with S3ReplicaClient(s3_url, environ=env) as c:
        creds = c._s3._request_signer._credentials
        assert (creds.access_key, creds.secret_key, creds.token) == ("lk", "ls", None)


def test_bucket_region(s3_admin, bucket):
    assert bucket_region(s3_admin, bucket) == "us-east-1"
    other = f"eu-{uuid.uuid4().hex[:8]}"
    s3_admin.create_bucket(Bucket=other,
                           CreateBucketConfiguration={"LocationConstraint": "eu-west-2"})
    assert bucket_region(s3_admin, other) == "eu-west-2"


def test_client_config_follows_url(s3_server, bucket):
    with S3ReplicaClient(f"s3://{bucket}/a/b?endpoint={s3_server}&region=eu-central-1"
                         f"&forcePathStyle=false") as c:
        meta = c._s3.meta
        assert (meta.region_name, meta.endpoint_url) == ("eu-central-1", s3_server)
        assert meta.config.s3["addressing_style"] == "auto"
        assert meta.config.retries["total_max_attempts"] == 10
        assert meta.config.max_pool_connections >= 32
        assert c.key(9, 1, 2) == "a/b/0009/0000000000000001-0000000000000002.ltx"
    with pytest.raises(StorageError, match="closed"):
        c.list_files(0)


def test_list_all_levels_in_one_request(client, s3_admin, bucket):
    for level, lo, hi in ((0, 5, 5), (0, 6, 6), (1, 1, 4), (9, 1, 6), (3, 2, 2)):
        client.write(level, lo, hi, b"x" * (lo + hi), 1_700_000_000_000)
    s3_admin.put_object(Bucket=bucket, Key="db/000a/0000000000000001-0000000000000001.ltx", Body=b"")
    s3_admin.put_object(Bucket=bucket, Key="db/0000/junk.txt", Body=b"")
    s3_admin.put_object(Bucket=bucket, Key="db/lock.json", Body=b"{}")
    client.requests.reset()
    everything = client.list_all()
    assert client.requests["LIST"] == 1
    assert everything == {lvl: client.list_files(lvl) for lvl in range(10)}
    assert [(f.min_txid, f.max_txid) for f in everything[0]] == [(5, 5), (6, 6)]
    assert len(everything[9]) == 1 and everything[9][0].size == 7


def test_list_from_a_txid_asks_s3_only_for_newer_files(s3_url):
    """A poll or sync lists from the next TXID: S3 must skip the retained older files itself
    (StartAfter), not send them all for us to drop, so each listing stays one small page."""
    c = S3ReplicaClient(s3_url, list_page_size=2)
    try:
        for lo in range(1, 12):
            c.write(0, lo, lo, b"x", TS)
        c.write(0, 12, 14, b"x", TS)
        c.requests.reset()
        newer = c.list_files(0, seek=10)
        assert [(f.min_txid, f.max_txid) for f in newer] == [(10, 10), (11, 11), (12, 14)]
        assert c.requests["LIST"] == 2  # 3 keys in pages of 2, not 12 keys in 6 pages
        assert c.list_files(0, seek=15) == []
        assert [f.min_txid for f in c.list_files(0, seek=1)] == list(range(1, 13))
        assert [f.min_txid for f in c.list_files(0, seek=12)] == [12]
    finally:
        c.close()
