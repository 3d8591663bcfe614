"""S3 replica client: Litestream 0.5.x's S3 layout and requests, on one shared boto3 client.

boto3 *clients* are thread-safe (sessions and resources are not), so every thread of the VFS shares
one client and its connection pool; the pool is sized for the page fetcher's parallel ranged GETs.
Keys are ``<prefix>/<level %04x>/<min>-<max>.ltx``; each object carries the LTX header timestamp
as ``litestream-timestamp`` metadata so time travel can work from a listing (spec 2.1, 2.4).
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from typing import Any, BinaryIO

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from ..errors import (
    AccessDeniedError,
    BucketNotFoundError,
    ObjectExistsError,
    ObjectNotFoundError,
    StorageError,
)
from .base import (
    MAX_LEVEL,
    FileInfo,
    ReplicaClient,
    check_level,
    ltx_filename,
    parse_ltx_filename,
)
from .counter import RequestCounter
from .redact import SECRETS
from .s3_metadata import METADATA_KEY, format_timestamp, ms_to_datetime, parse_timestamp
from .s3_stores import (
    add_content_md5,
    add_tigris_header,
    forbid_overwrite_adder,
    forbid_overwrite_header,
    probe_create_only,
)
from .url import DEFAULT_REGION, ReplicaURL, parse_replica_url, redact_url

DELETE_BATCH = 1000
MAX_PARTS = 10_000
log = logging.getLogger("ltxvfs.storage")

DEFAULT_UPLOAD_CONCURRENCY = 5  # the Go SDK uploader's default
DEFAULT_MAX_POOL_CONNECTIONS = 64  # pooled HTTP connections per client
DEFAULT_METADATA_CONCURRENCY = 16  # HEADs in flight when a listing asks for timestamps
#: GETs of one range when the response body breaks off mid-stream (botocore does not retry that).
BODY_ATTEMPTS = 4

_ACCESS_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "ExpiredToken", "InvalidToken", "TokenRefreshRequired", "AccountProblem",
})
#: A create-only write met an existing object: 412 PreconditionFailed (If-None-Match), AWS's 409
#: ConditionalRequestConflict (a concurrent conditional write), Aliyun OSS's 409
#: FileAlreadyExists (x-oss-forbid-overwrite), IBM COS's 409 ObjectAlreadyExists.
_EXISTS_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict",
                           "FileAlreadyExists", "ObjectAlreadyExists"})
_KIND_BY_OPERATION = {"ListObjectsV2": "LIST", "ListObjects": "LIST", "ListParts": "LIST",
                      "ListMultipartUploads": "LIST", "DeleteObjects": "DELETE"}
_KIND_BY_METHOD = {"GET": "GET", "HEAD": "HEAD", "DELETE": "DELETE"}


def resolve_credentials(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """Litestream's static credentials: ``AWS_*`` else ``LITESTREAM_*``; None → boto3's chain.

    As in Litestream, a static pair is used without a session token (AWS_SESSION_TOKEN ignored).
    """
    key = environ.get("AWS_ACCESS_KEY_ID") or environ.get("LITESTREAM_ACCESS_KEY_ID")
    secret = (environ.get("AWS_SECRET_ACCESS_KEY")
              or environ.get("LITESTREAM_SECRET_ACCESS_KEY"))
    return (key, secret) if key and secret else None


def bucket_region(client: Any, bucket: str) -> str:
    """GetBucketLocation → region name (None/"" is us-east-1, legacy "EU" is eu-west-1)."""
    constraint = client.get_bucket_location(Bucket=bucket).get("LocationConstraint") or ""
    return {"": DEFAULT_REGION, "EU": "eu-west-1"}.get(constraint, constraint)


class S3ReplicaClient(ReplicaClient):
    """One replica in S3 (or an S3-compatible store). Thread-safe; connects on first use.

    The boto3 client is created lazily because without a region in the URL or an endpoint,
    creating it costs a GetBucketLocation round trip; ``check()`` forces that early.
    """

    def __init__(self, url: ReplicaURL | str, *, environ: Mapping[str, str] | None = None,
                 part_size: int | None = None, max_attempts: int = 10,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 max_pool_connections: int = DEFAULT_MAX_POOL_CONNECTIONS,
                 metadata_concurrency: int = DEFAULT_METADATA_CONCURRENCY,
                 list_page_size: int = 1000) -> None:
        cfg = url if isinstance(url, ReplicaURL) else parse_replica_url(url, environ)
        if cfg.scheme != "s3":
            raise ValueError(f"not an s3 replica URL: {cfg.url}")
        self.config = cfg
        self.url = cfg.url
        self.requests = RequestCounter()
        self._bucket = cfg.bucket
        self._prefix = cfg.prefix
        self._credentials = resolve_credentials(os.environ if environ is None else environ)
        self._part_size = part_size or cfg.part_size
        self._upload_concurrency = cfg.concurrency or DEFAULT_UPLOAD_CONCURRENCY
        self._metadata_concurrency = metadata_concurrency
        self._page_size = list_page_size
        self._botocore_config = dict(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout, read_timeout=read_timeout,
            max_pool_connections=max_pool_connections,
            s3={"addressing_style": "path" if cfg.force_path_style else "auto",
                "payload_signing_enabled": cfg.sign_payload},
            # Litestream turns the SDK's default CRC trailers off for custom endpoints: many
            # S3-compatible stores reject aws-chunked bodies.
            request_checksum_calculation="when_required" if cfg.endpoint else "when_supported",
            response_checksum_validation="when_required" if cfg.endpoint else "when_supported",
        )
        self._sse_c: dict[str, str] = {}
        if cfg.sse_customer_key:
            self._sse_c = {"SSECustomerAlgorithm": cfg.sse_customer_algorithm,
                           "SSECustomerKey": cfg.sse_customer_key,
                           "SSECustomerKeyMD5": cfg.sse_customer_key_md5}
        self._put_args: dict[str, str] = dict(self._sse_c)
        if cfg.storage_class:
            self._put_args["StorageClass"] = cfg.storage_class
        if cfg.sse_kms_key_id:
            self._put_args.update(ServerSideEncryption="aws:kms", SSEKMSKeyId=cfg.sse_kms_key_id)
        #: The store's own create-only header (OSS, COS), sent beside If-None-Match; "" if none.
        self.forbid_overwrite_header = forbid_overwrite_header(cfg)
        self._lock = threading.Lock()
        self._client: Any = None
        self._closed = False

    @property
    def identity(self) -> str:
        return self.config.identity

    @property
    def store(self) -> str:
        """The store, for messages: its endpoint (redacted) and bucket, never a credential."""
        where = redact_url(self.config.endpoint) if self.config.endpoint else "AWS S3"
        return f"{where} (bucket {self._bucket!r})"

    @property
    def create_only(self) -> str:
        """How a create-only write is spelled to this store."""
        extra = f" and {self.forbid_overwrite_header}: true" if self.forbid_overwrite_header else ""
        return f"If-None-Match: *{extra}"

    @property
    def _s3(self) -> Any:
        client = self._client
        if client is None:
            with self._lock:
                if self._closed:
                    raise StorageError(f"s3 client for {self.url} is closed")
                if self._client is None:
                    try:
                        self._client = self._make_client()
                    except (ClientError, BotoCoreError) as exc:
                        raise self._error(exc, "connect to", None, BucketNotFoundError) from exc
                client = self._client
        return client

    def _make_client(self) -> Any:
        cfg = self.config
        secrets = [cfg.sse_customer_key]
        if cfg.sse_customer_key:
            # botocore sends (and logs) the key base64-encoded too.
            secrets.append(base64.b64encode(cfg.sse_customer_key.encode()).decode())
        if self._credentials:
            secrets.append(self._credentials[1])
        SECRETS.add(*secrets)
        region = cfg.region or (DEFAULT_REGION if cfg.endpoint else None)
        kwargs: dict[str, Any] = {"endpoint_url": cfg.endpoint or None,
                                  "verify": not cfg.skip_verify,
                                  "config": Config(**self._botocore_config)}
        if self._credentials:
            kwargs.update(aws_access_key_id=self._credentials[0],
                          aws_secret_access_key=self._credentials[1], aws_session_token=None)
        if region is None:
            probe = _new_client(region_name=DEFAULT_REGION, **kwargs)
            self._count_on(probe)
            try:
                region = bucket_region(probe, self._bucket)
            finally:
                probe.close()
        client = _new_client(region_name=region, **kwargs)
        self._count_on(client)
        if cfg.require_content_md5:
            client.meta.events.register("before-sign.s3.DeleteObjects", add_content_md5)
        if cfg.is_tigris:
            client.meta.events.register("before-sign.s3", add_tigris_header)
        if self.forbid_overwrite_header:
            add = forbid_overwrite_adder(self.forbid_overwrite_header)
            for operation in ("PutObject", "CompleteMultipartUpload"):
                client.meta.events.register(f"before-sign.s3.{operation}", add)
        return client

    def _count_on(self, client: Any) -> None:
        def count(model: Any, **_: Any) -> None:
            kind = _KIND_BY_OPERATION.get(model.name) or _KIND_BY_METHOD.get(model.http["method"])
            self.requests.add(kind or "PUT")
        client.meta.events.register("before-call.s3", count)
        client.meta.events.register_first("needs-retry.s3", self._say_retrying)

    def _say_retrying(self, attempts: int = 0, caught_exception: Exception | None = None,
                      response: Any = None, operation: Any = None, **_: Any) -> None:
        """Say at INFO, once per call, that a request failed and botocore retries it (up to
        ``max_attempts`` attempts with exponential backoff: ~10-15 s for an endpoint that
        refuses connections), so an unreachable store is not a silent wait. Decides nothing."""
        if attempts != 1:
            return None
        if caught_exception is not None:
            reason = f"{type(caught_exception).__name__}: {caught_exception}"
        elif response is not None and response[0].status_code >= 500:
            reason = f"HTTP {response[0].status_code}"
        else:
            return None
        name = getattr(operation, "name", "request")
        log.info("s3: %s on %s failed (%s); retrying, up to %d attempts", name, self.url, reason,
                 self._botocore_config["retries"]["total_max_attempts"])
        return None

    def check(self) -> None:
        """HeadBucket: fail fast on a missing bucket, wrong endpoint or refused credentials."""
        try:
            self._s3.head_bucket(Bucket=self._bucket)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "check bucket", None, BucketNotFoundError) from exc

    def probe_create_only(self) -> str:
        """Prove that the store refuses to overwrite (s3_stores.probe_create_only)."""
        return probe_create_only(self)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def key(self, level: int, min_txid: int, max_txid: int) -> str:
        """The object key of an LTX file (Litestream's S3 layout, level in %04x)."""
        return f"{self._prefix}/{check_level(level):04x}/{ltx_filename(min_txid, max_txid)}"

    def list_files(self, level: int, *, seek: int = 0,
                   use_metadata: bool = False) -> list[FileInfo]:
        prefix = f"{self._prefix}/{check_level(level):04x}/"
        # Keys sort as their TXIDs (fixed-width lowercase hex): starting after the greatest
        # possible name of min_txid = seek-1 makes S3 skip every older file, so a follower's poll
        # or a writer's sync lists only what is new, however many files retention keeps.
        start_after = prefix + ltx_filename(seek - 1, (1 << 64) - 1) if seek > 1 else None
        infos: list[FileInfo] = []
        try:
            for page in self._list_pages(prefix, start_after):
                for obj in page.get("Contents", ()):
                    txids = parse_ltx_filename(obj["Key"][len(prefix):])
                    if txids is None or txids[0] < seek:
                        continue
                    infos.append(FileInfo(level, txids[0], txids[1], obj["Size"],
                                          obj["LastModified"].astimezone(UTC), obj.get("ETag", "")))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list", prefix) from exc
        if use_metadata and infos:
            infos = self._with_metadata_timestamps(infos)
        infos.sort(key=lambda f: (f.min_txid, f.max_txid))
        return infos

    def _list_pages(self, prefix: str, start_after: str | None = None) -> Any:
        """ListObjectsV2 pages, following continuation tokens. (Not botocore's paginator: loading
        its model costs ~60 ms on the first listing, a third of a cold open.)"""
        kwargs: dict[str, Any] = {"Bucket": self._bucket, "Prefix": prefix,
                                  "MaxKeys": self._page_size}
        if start_after is not None:
            kwargs["StartAfter"] = start_after
        while True:
            page = self._s3.list_objects_v2(**kwargs)
            yield page
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return
            kwargs["ContinuationToken"] = token

    def list_all(self, *, use_metadata: bool = False) -> dict[int, list[FileInfo]]:
        """All levels in one paginated listing of ``<prefix>/`` (1 LIST per 1,000 files)."""
        prefix = f"{self._prefix}/"
        levels: dict[int, list[FileInfo]] = {lvl: [] for lvl in range(MAX_LEVEL + 1)}
        try:
            for page in self._list_pages(prefix):
                for obj in page.get("Contents", ()):
                    rest = obj["Key"][len(prefix):]
                    level_dir, _, name = rest.partition("/")
                    if len(level_dir) != 4 or not all(c in "0123456789abcdef" for c in level_dir):
                        continue
                    level = int(level_dir, 16)
                    txids = parse_ltx_filename(name)
                    if level > MAX_LEVEL or txids is None:
                        continue
                    levels[level].append(FileInfo(level, txids[0], txids[1], obj["Size"],
                                                  obj["LastModified"].astimezone(UTC),
                                                  obj.get("ETag", "")))
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "list", prefix) from exc
        for lvl, infos in levels.items():
            if use_metadata and infos:
                infos = self._with_metadata_timestamps(infos)
            infos.sort(key=lambda f: (f.min_txid, f.max_txid))
            levels[lvl] = infos
        return levels

    def _with_metadata_timestamps(self, infos: list[FileInfo]) -> list[FileInfo]:
        """created_at from ``litestream-timestamp`` (one HEAD each, bounded concurrency).

        Like Litestream, a failed HEAD or missing/invalid metadata keeps LastModified: objects
        uploaded by other tools still list, just with a less precise time.
        """
        def fetch(info: FileInfo) -> FileInfo:
            try:
                head = self._s3.head_object(Bucket=self._bucket, Key=self.key(
                    info.level, info.min_txid, info.max_txid), **self._sse_c)
            except (ClientError, BotoCoreError):
                return info
            ts = parse_timestamp(head.get("Metadata", {}).get(METADATA_KEY, ""))
            return info if ts is None else dataclasses.replace(info, created_at=ts)

        with ThreadPoolExecutor(min(self._metadata_concurrency, len(infos)),
                                thread_name_prefix="ltxvfs-head") as pool:
            return list(pool.map(fetch, infos))

    def read(self, level: int, min_txid: int, max_txid: int, offset: int = 0,
             size: int | None = None) -> bytes:
        if offset < 0 or (size is not None and size < 0):
            raise ValueError(f"invalid range: offset={offset} size={size}")
        key = self.key(level, min_txid, max_txid)
        if size == 0:
            return b""
        rng = f"bytes={offset}-" if size is None else f"bytes={offset}-{offset + size - 1}"
        try:
            for attempt in range(BODY_ATTEMPTS):
                body = self._s3.get_object(Bucket=self._bucket, Key=key, Range=rng,
                                           **self._sse_c)["Body"]
                try:
                    return body.read()  # type: ignore[no-any-return]
                except BotoCoreError:  # the body broke off: botocore retries only until headers
                    if attempt + 1 == BODY_ATTEMPTS:
                        raise
                finally:
                    body.close()
            raise AssertionError("unreachable")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                return b""  # offset at/after the end: a short read, as from a file
            raise self._error(exc, "read", key) from exc
        except BotoCoreError as exc:
            raise self._error(exc, "read", key) from exc

    def write(self, level: int, min_txid: int, max_txid: int, data: bytes | BinaryIO,
              timestamp_ms: int, *, exclusive: bool = False) -> FileInfo:
        """PutObject below the part size, else a multipart upload (both conditional if exclusive).

        A file body is streamed part by part, so at most ``concurrency`` parts are in memory.
        """
        key = self.key(level, min_txid, max_txid)
        created_at = ms_to_datetime(timestamp_ms)
        args = {"Bucket": self._bucket, "Key": key,
                "Metadata": {METADATA_KEY: format_timestamp(timestamp_ms)}, **self._put_args}
        condition = {"IfNoneMatch": "*"} if exclusive else {}
        if isinstance(data, (bytes, bytearray, memoryview)) or not data.seekable():
            data = bytes(data) if isinstance(data, (bytes, bytearray, memoryview)) else data.read()
            start, size = 0, len(data)
        else:
            start = data.tell()
            size = data.seek(0, 2) - start
            data.seek(start)
        try:
            if size < self._part_size:
                body = data if isinstance(data, bytes) else data.read(size)
                resp = self._s3.put_object(Body=body, **args, **condition)
            else:
                resp = self._multipart_upload(args, condition, data, start, size)
        except (ClientError, BotoCoreError) as exc:
            raise self._error(exc, "write", key) from exc
        return FileInfo(level, min_txid, max_txid, size, created_at, resp.get("ETag", ""))

    def _multipart_upload(self, args: dict[str, Any], condition: dict[str, str],
                          data: bytes | BinaryIO, start: int, size: int) -> dict[str, Any]:
        part_size = max(self._part_size, -(-size // MAX_PARTS))
        n_parts = -(-size // part_size)
        upload_id = self._s3.create_multipart_upload(**args)["UploadId"]
        target = {"Bucket": args["Bucket"], "Key": args["Key"], "UploadId": upload_id}

        def chunk(index: int) -> bytes:
            begin = index * part_size
            length = min(part_size, size - begin)
            if isinstance(data, bytes):
                return data[begin:begin + length]
            data.seek(start + begin)
            return data.read(length)

        def upload(index: int, body: bytes) -> dict[str, Any]:
            resp = self._s3.upload_part(PartNumber=index + 1, Body=body, **target, **self._sse_c)
            return {"PartNumber": index + 1, "ETag": resp["ETag"]}

        try:
            parts: list[dict[str, Any]] = []
            wave = self._upload_concurrency
            with ThreadPoolExecutor(wave, thread_name_prefix="ltxvfs-upload") as pool:
                for first in range(0, n_parts, wave):
                    futures = [pool.submit(upload, i, chunk(i))
                               for i in range(first, min(first + wave, n_parts))]
                    parts.extend(f.result() for f in futures)
            return self._s3.complete_multipart_upload(MultipartUpload={"Parts": parts}, **target,
                                                      **condition)
        except BaseException:
            try:
                self._s3.abort_multipart_upload(**target)
            except (ClientError, BotoCoreError):
                pass  # the original error matters; a lifecycle rule reaps leftovers
            raise

    def delete(self, files: list[FileInfo]) -> None:
        keys = [self.key(f.level, f.min_txid, f.max_txid) for f in files]
        for i in range(0, len(keys), DELETE_BATCH):
            batch = keys[i:i + DELETE_BATCH]
            try:
                resp = self._s3.delete_objects(Bucket=self._bucket, Delete={
                    "Objects": [{"Key": k} for k in batch], "Quiet": True})
            except (ClientError, BotoCoreError) as exc:
                raise self._error(exc, "delete", f"{len(batch)} objects from {batch[0]}") from exc
            errors = [e for e in resp.get("Errors", ()) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                cls = AccessDeniedError if first.get("Code") in _ACCESS_CODES else StorageError
                raise cls(f"s3: delete from {self.url}: {len(errors)} of {len(batch)} objects "
                          f"failed, first {first.get('Key')}: {first.get('Code')} "
                          f"{first.get('Message', '')}".rstrip())

    def _error(self, exc: Exception, what: str, key: str | None,
               missing: type[StorageError] = ObjectNotFoundError) -> StorageError:
        """Map a botocore error to our tree; the message names the redacted URL and the key."""
        where = f"s3: {what} {key} in {self.url}" if key else f"s3: {what} {self.url}"
        if isinstance(exc, NoCredentialsError):
            return AccessDeniedError(f"{where}: no AWS credentials found (set AWS_ACCESS_KEY_ID "
                                     f"and AWS_SECRET_ACCESS_KEY, or configure a profile)")
        if not isinstance(exc, ClientError):
            return StorageError(f"{where}: {exc}")
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        label = f"{code} " if code and code != str(status) else ""
        detail = f"{where}: {label}(HTTP {status}) {error.get('Message', '')}".rstrip()
        if code == "NoSuchBucket":
            return BucketNotFoundError(f"{where}: bucket {self._bucket!r} does not exist")
        if code in _ACCESS_CODES or status == 403:
            return AccessDeniedError(detail)
        if code in _EXISTS_CODES or status == 412:
            return ObjectExistsError(f"{where}: the object already exists ({code or status})")
        if code == "NoSuchKey" or status == 404:
            return missing(detail)
        return StorageError(detail)


_session_lock = threading.Lock()
if hasattr(os, "register_at_fork"):  # a parent's thread may hold it at fork
    os.register_at_fork(after_in_child=lambda: globals().update(_session_lock=threading.Lock()))
_session: boto3.session.Session | None = None


def _new_client(**kwargs: Any) -> Any:
    """An S3 client from one process-wide session, created under a lock.

    Sessions are not thread-safe, but a fresh one per client reloads the S3 service model
    (~0.3 s); sharing one keeps that cache. The clients themselves are thread-safe.
    """
    global _session
    with _session_lock:
        if _session is None:
            _session = boto3.session.Session()
        return _session.client("s3", **kwargs)


def warm_up() -> None:
    """Load boto3 and the S3 service model ahead of the first open (~0.3 s, no network): the
    VFS calls this in a background thread at registration."""
    client = _new_client(region_name=DEFAULT_REGION, endpoint_url="http://127.0.0.1:9",
                         aws_access_key_id="warm-up", aws_secret_access_key="warm-up")
    client.close()


