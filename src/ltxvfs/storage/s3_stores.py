"""What differs between S3-compatible stores, and the probe that checks the one promise write
mode needs from them: that a create-only write (``If-None-Match: *``) is refused when the key
exists (issue 16; docs/write-mode.md "One writer").

Stores that spell "create only" their own way (Aliyun OSS, Tencent COS) get their header beside
``If-None-Match``; Tigris is asked for consistent listings; stores that predate CRC checksums get
``Content-MD5`` on DeleteObjects. The probe: two create-only PUTs of one new key, then a DELETE.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from typing import TYPE_CHECKING, Any

from botocore.exceptions import BotoCoreError, ClientError

from ..errors import AccessDeniedError, BucketNotFoundError, ObjectExistsError, StorageError, UnsafeStoreError
from .base import PROBE_BODY, PROBE_DIR, probe_name
from .url import ReplicaURL

if TYPE_CHECKING:
    from .s3 import S3ReplicaClient

log = logging.getLogger("ltxvfs.storage")

#: Stores that spell "create only" with a header of their own (value ``true``), by endpoint host
#: suffix: sent beside ``If-None-Match: *`` on every create-only write; the probe checks that
#: one of them is kept.
_FORBID_OVERWRITE_HEADERS = ((".aliyuncs.com", "x-oss-forbid-overwrite"),
                             (".myqcloud.com", "x-cos-forbid-overwrite"),
                             (".tencentcos.cn", "x-cos-forbid-overwrite"))


def probe_create_only(self: S3ReplicaClient) -> str:
    """Two create-only PUTs of one new key under ``<prefix>/ltxvfs-probe/``: the first must
    be stored, the second refused (412, or the vendor's 409); then one DELETE. Needs
    s3:PutObject and s3:DeleteObject there (the writer needs both anyway)."""
    key = f"{self._prefix}/{PROBE_DIR}/{probe_name()}"
    args = {"Bucket": self._bucket, "Key": key, "Body": PROBE_BODY, "IfNoneMatch": "*",
            **self._put_args}
    try:
        try:
            self._s3.put_object(**args)
        except (ClientError, BotoCoreError) as exc:
            err = self._error(exc, "create-only probe: PUT", key)
            # 412 here: botocore retried a PUT whose answer was lost and met it. Fine.
            if not isinstance(err, ObjectExistsError):
                raise _probe_failed(self, err, exc, "the first") from exc
        try:
            self._s3.put_object(**args)
        except (ClientError, BotoCoreError) as exc:
            err = self._error(exc, "create-only probe: PUT", key)
            if isinstance(err, ObjectExistsError):
                return self.create_only  # refused, as promised
            raise _probe_failed(self, err, exc, "the second") from exc
        raise UnsafeStoreError(
            f"the store {self.store} does not keep create-only writes: a second PUT of "
            f"{key} with {self.create_only} replaced the object instead of failing with 412 "
            f"Precondition Failed", overwrote=True)
    finally:
        try:
            self._s3.delete_object(Bucket=self._bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            log.warning("create-only probe: could not delete %s from %s (harmless, safe to "
                        "delete): %s", key, self.url, exc)

def _probe_failed(self: S3ReplicaClient, err: StorageError, exc: Exception,
              which: str) -> StorageError:
    """What a probe PUT that failed means: no permission (say which); a store that rejects
    create-only writes (4xx other than that, or 501: UnsafeStoreError); or trouble to retry
    at the next start (5xx after botocore's retries, network: as it is)."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") \
        if isinstance(exc, ClientError) else None
    if isinstance(err, AccessDeniedError):
        return AccessDeniedError(
            f"{err}; write mode first checks that the store refuses to overwrite, with two "
            f"PUTs and a DELETE under {self._prefix}/{PROBE_DIR}/: it needs s3:PutObject and "
            f"s3:DeleteObject there")
    if isinstance(err, BucketNotFoundError) or status is None or \
            (status >= 500 and status != 501):
        return err
    return UnsafeStoreError(
        f"the store {self.store} rejects create-only writes: {which} PUT with "
        f"{self.create_only} failed: {err}")


def add_content_md5(request: Any, **_: Any) -> None:
    """Content-MD5 on DeleteObjects: stores that predate CRC checksums still require it."""
    if "Content-MD5" not in request.headers and request.body:
        body = request.body if isinstance(request.body, bytes) else request.body.encode()
        request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()


def forbid_overwrite_header(cfg: ReplicaURL) -> str:
    """The store's own create-only header (Aliyun OSS, Tencent COS) by endpoint host, or ""."""
    host = cfg.endpoint_host
    host = host if host.startswith("[") else host.partition(":")[0]
    return next((h for suffix, h in _FORBID_OVERWRITE_HEADERS if host.endswith(suffix)), "")


def forbid_overwrite_adder(header: str) -> Any:
    """A before-sign hook: a request that says If-None-Match also says ``header: true``."""
    def add(request: Any, **_: Any) -> None:
        if "If-None-Match" in request.headers and header not in request.headers:
            request.headers[header] = "true"
    return add


def add_tigris_header(request: Any, **_: Any) -> None:
    """Tigris serves strongly consistent listings only when asked (Litestream always asks)."""
    request.headers["X-Tigris-Consistent"] = "true"
