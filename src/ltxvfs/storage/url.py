"""Replica URLs (``s3://bucket/path?…``, ``file:///dir``) parsed the way Litestream 0.5.x does.

One frozen :class:`ReplicaURL` carries everything a storage client needs, so the clients never
look at raw URL text or the environment again. The rules (host styles, ``endpoint`` scheme and
path-style defaults, boolean spellings, ``LITESTREAM_S3_ENDPOINT``) follow Litestream's
``ParseReplicaURLWithQuery`` + ``s3.NewReplicaClientFromURL`` so a URL that works with the
``litestream`` binary means the same thing here. Where we are stricter it is to fail loudly instead
of silently doing something else (see the notes on :func:`parse_replica_url`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit

from ..errors import ReplicaURLError

DEFAULT_REGION = "us-east-1"
#: Smallest S3 multipart part (and Litestream's default part size): 5 MiB.
MIN_PART_SIZE = 5 * 1024 * 1024

_SECRET_WORDS = ("key", "secret", "token", "password", "signature", "credential")
_REDACTED = "REDACTED"

_TRUE = frozenset({"true", "1", "t", "yes"})
_FALSE = frozenset({"false", "0", "f", "no"})

_AWS_RE = re.compile(r"^(.+)\.s3(?:\.([^.]+))?\.amazonaws\.com$")
_DO_RE = re.compile(r"^(?:(.+)\.)?([^.]+)\.digitaloceanspaces.com$")
_B2_RE = re.compile(r"^(?:(.+)\.)?s3.([^.]+)\.backblazeb2.com$")
_FILEBASE_RE = re.compile(r"^(?:(.+)\.)?s3.filebase.com$")
_SCW_RE = re.compile(r"^(?:(.+)\.)?s3.([^.]+)\.scw\.cloud$")

_TIGRIS_HOSTS = ("fly.storage.tigris.dev", "t3.storage.dev")
_LOCAL_NETS = tuple(ipaddress.ip_network(n) for n in
                    ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "::1/128"))


@dataclass(frozen=True)
class ReplicaURL:
    """A parsed replica URL. ``url`` is the redacted text, safe for logs and messages."""

    scheme: str  # "s3" or "file"
    url: str
    #: file: the replica root directory (absolute).
    path: Path | None = None
    # --- s3 ---
    bucket: str = ""
    #: Key prefix without leading/trailing '/'; never empty (see parse_replica_url).
    prefix: str = ""
    #: With scheme (http:// or https://), or "" for AWS's own endpoints.
    endpoint: str = ""
    #: "" means: us-east-1 if an endpoint is set, else ask GetBucketLocation.
    region: str = ""
    force_path_style: bool = False
    skip_verify: bool = False
    sign_payload: bool = True
    require_content_md5: bool = True
    #: Parallel parts of one multipart upload (None: client default).
    concurrency: int | None = None
    part_size: int = MIN_PART_SIZE
    storage_class: str = ""
    sse_customer_algorithm: str = ""
    sse_customer_key: str = field(default="", repr=False)
    sse_customer_key_md5: str = field(default="", repr=False)
    sse_kms_key_id: str = ""

    @property
    def identity(self) -> str:
        """The replica's location, the same however the URL was spelled (``s3://b/p`` and
        ``s3://b/p/``, ``/r`` and ``file:///r``): what ltxvfs keys replicas and their private
        local files by. No secrets."""
        if self.scheme == "file":
            return "file:" + os.path.realpath(str(self.path))
        endpoint = self.endpoint.rstrip("/").lower()
        return f"s3:{endpoint}|{self.bucket}|{self.prefix}"

    @property
    def endpoint_host(self) -> str:
        """The endpoint's host (and port), lower case; "" for AWS's own endpoints."""
        return _endpoint_host(self.endpoint)

    @property
    def is_tigris(self) -> bool:
        return _endpoint_host(self.endpoint) in _TIGRIS_HOSTS


def redact_url(url: str) -> str:
    """``url`` with the userinfo password and every secret-looking query value replaced.

    Works on the raw text (no parse/re-serialise), so it also redacts URLs we cannot parse and
    leaves everything else byte-for-byte as written. A query parameter is secret when its decoded
    name contains key/secret/token/password/signature/credential (``sseCustomerKey``, presigned
    ``X-Amz-Signature`` …).
    """
    rest, hash_, fragment = url.partition("#")
    rest, qmark, query = rest.partition("?")
    scheme_sep = rest.find("://")
    if scheme_sep >= 0:
        start = scheme_sep + 3
        end = rest.find("/", start)
        end = len(rest) if end < 0 else end
        netloc = rest[start:end]
        userinfo, at, hostport = netloc.rpartition("@")
        if at and ":" in userinfo:
            user = userinfo.split(":", 1)[0]
            rest = f"{rest[:start]}{user}:{_REDACTED}@{hostport}{rest[end:]}"
    if qmark:
        parts = []
        for part in query.split("&"):
            name, eq, _value = part.partition("=")
            if eq and _is_secret_name(name):
                part = f"{name}={_REDACTED}"
            parts.append(part)
        query = "&".join(parts)
    return rest + qmark + query + hash_ + fragment


def _is_secret_name(name: str) -> bool:
    lowered = unquote_plus(name).lower()
    return any(word in lowered for word in _SECRET_WORDS)


def parse_replica_url(url: str, environ: Mapping[str, str] | None = None) -> ReplicaURL:
    """Parse ``s3://…``, ``file:///…`` or a bare absolute path into a :class:`ReplicaURL`.

    ``environ`` (default ``os.environ``) supplies ``LITESTREAM_S3_ENDPOINT``. Raises
    ReplicaURLError, naming the redacted URL and the problem, for anything we would otherwise have
    to guess about. Stricter than Litestream on purpose: an empty S3 prefix (Litestream would write
    keys ``./0000/…`` or ``/0000/…`` at the bucket root), boolean values other than
    true/1/t/yes/false/0/f/no (Litestream silently treats them as false), a part size under
    5 MiB (Litestream fails every upload), and ``file://host/…`` or relative file paths.
    """
    if not isinstance(url, str) or not url:
        raise ReplicaURLError("empty replica URL")
    env = os.environ if environ is None else environ
    if url.startswith("/"):
        return _parse_file(url, "file://" + url)
    lower = url.lower()
    if lower.startswith("file:"):
        return _parse_file(url, url)
    if lower.startswith("s3://"):
        return _parse_s3(url, env)
    scheme = url.split(":", 1)[0] if ":" in url else ""
    if not scheme or "/" in scheme:
        raise _error(url, "a scheme (s3:// or file://) or an absolute path is required")
    raise _error(url, f"unsupported scheme {scheme!r} (use s3:// or file://)")


def _error(url: str, problem: str) -> ReplicaURLError:
    return ReplicaURLError(f"invalid replica URL {redact_url(url)!r}: {problem}")


def _parse_file(url: str, as_url: str) -> ReplicaURL:
    if url.startswith("/"):
        raw_path = url
    else:
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise _error(url, f"cannot parse: {exc}") from None
        if parts.netloc not in ("", "localhost"):
            raise _error(url, f"file URLs take no host ({parts.netloc!r}); "
                              "use file:///absolute/path")
        raw_path = unquote(parts.path)
    if not raw_path.startswith("/"):
        raise _error(url, "file replica path must be absolute (file:///absolute/path)")
    path = posixpath.normpath(raw_path)
    if path == "/":
        raise _error(url, "refusing to use '/' as a replica directory")
    return ReplicaURL(scheme="file", url=redact_url(as_url), path=Path(path))


def _parse_s3(url: str, env: Mapping[str, str]) -> ReplicaURL:
    host, raw_path, query = _split_s3(url)
    q = _Query(url, query)

    region = ""
    endpoint = ""
    path_style = False
    if host.startswith("arn:"):
        bucket = host
        fields = host.split(":", 5)
        region = fields[3] if len(fields) >= 4 else ""
    else:
        bucket, region, endpoint, path_style = _parse_host(host)
    if not bucket:
        raise _error(url, "a bucket name is required (s3://BUCKET/path)")

    # An endpoint from the query or LITESTREAM_S3_ENDPOINT implies path style unless the query
    # says otherwise; an explicit forcePathStyle always wins.
    path_style_set = q.bool("forcePathStyle", "force-path-style")
    if (q_endpoint := q.get("endpoint")):
        endpoint = ensure_endpoint_scheme(q_endpoint)
        path_style = True
    elif not endpoint and (env_endpoint := env.get("LITESTREAM_S3_ENDPOINT", "")):
        endpoint = ensure_endpoint_scheme(env_endpoint)
        path_style = True
    if path_style_set is not None:
        path_style = path_style_set
    if (q_region := q.get("region")):
        region = q_region
    if endpoint and not endpoint.startswith(("http://", "https://")):
        endpoint = "https://" + endpoint  # filebase/scw host forms; Litestream adds it later

    ep_host = _endpoint_host(endpoint)
    if path_style_set is None and (
            ep_host == "s3.filebase.com" or ep_host.endswith((".backblazeb2.com", ".supabase.co"))
            or _is_minio_host(ep_host)):
        path_style = True
    sign_payload = q.bool("signPayload", "sign-payload")
    require_md5 = q.bool("requireContentMD5", "require-content-md5")
    if require_md5 is None and ep_host in _TIGRIS_HOSTS:
        require_md5 = False
    concurrency = q.int("concurrency")
    if concurrency is None and ep_host.endswith(".r2.cloudflarestorage.com"):
        concurrency = 2
    part_size = q.int("partSize", "part-size") or MIN_PART_SIZE
    if part_size < MIN_PART_SIZE:
        raise _error(url, f"partSize must be at least {MIN_PART_SIZE} bytes "
                          "(S3's minimum part size)")

    sse_alg = q.get("sseCustomerAlgorithm", "sse-customer-algorithm")
    sse_key = q.get("sseCustomerKey", "sse-customer-key")
    sse_md5 = q.get("sseCustomerKeyMD5", "sse-customer-key-md5")
    kms_key = q.get("sseKmsKeyId", "sse-kms-key-id")
    if sse_key:
        sse_alg, sse_md5 = _check_sse_c(url, endpoint, sse_alg, sse_key, sse_md5, kms_key)

    return ReplicaURL(
        scheme="s3", url=redact_url(url), bucket=bucket, prefix=_clean_prefix(url, raw_path),
        endpoint=endpoint, region=region, force_path_style=path_style,
        skip_verify=bool(q.bool("skipVerify", "skip-verify")),
        sign_payload=True if sign_payload is None else sign_payload,
        require_content_md5=True if require_md5 is None else require_md5,
        concurrency=concurrency, part_size=part_size,
        storage_class=q.get("storageClass", "storage-class"),
        sse_customer_algorithm=sse_alg, sse_customer_key=sse_key,
        sse_customer_key_md5=sse_md5, sse_kms_key_id=kms_key,
    )


def _split_s3(url: str) -> tuple[str, str, str]:
    """(host, decoded path, raw query). Access-point ARNs contain '/' and ':' so are cut by hand."""
    if url[5:].lower().startswith("arn:"):
        rest, _, query = url[5:].partition("?")
        rest = rest.partition("#")[0]
        marker = rest.lower().find(":accesspoint/")
        if marker < 0 or marker + len(":accesspoint/") >= len(rest):
            raise _error(url, "an access point ARN must look like arn:…:accesspoint/NAME")
        name_start = marker + len(":accesspoint/")
        slash = rest.find("/", name_start)
        if slash < 0:
            return rest, "", query
        return rest[:slash], "/" + unquote(rest[slash + 1:]), query
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise _error(url, f"cannot parse: {exc}") from None
    host = parts.netloc.rpartition("@")[2]  # userinfo is accepted and ignored, like Litestream
    return host, unquote(parts.path), parts.query


def _clean_prefix(url: str, raw_path: str) -> str:
    prefix = posixpath.normpath("/" + raw_path.lstrip("/")).lstrip("/")
    if not prefix:
        raise _error(url, "a path is required (s3://bucket/PATH); "
                          "refusing to write to the bucket root")
    return prefix


def _parse_host(host: str) -> tuple[str, str, str, bool]:
    """Litestream's ``s3.ParseHost``: (bucket, region, endpoint, force_path_style)."""
    if ":" in host and ".com" not in host:  # MinIO style bucket.host:port
        bucket, dot, rest = host.partition(".")
        if not dot:
            return "", "", "http://" + host, True
        return bucket, DEFAULT_REGION, "http://" + rest, True
    if m := _AWS_RE.match(host):
        return m.group(1), m.group(2) or "", "", False
    if m := _DO_RE.match(host):
        return m.group(1) or "", m.group(2), f"https://{m.group(2)}.digitaloceanspaces.com", False
    if m := _B2_RE.match(host):
        return m.group(1) or "", m.group(2), f"https://s3.{m.group(2)}.backblazeb2.com", True
    if m := _FILEBASE_RE.match(host):
        return m.group(1) or "", "", "s3.filebase.com", False
    if m := _SCW_RE.match(host):
        return m.group(1) or "", m.group(2), f"s3.{m.group(2)}.scw.cloud", False
    return host, "", "", False


def ensure_endpoint_scheme(endpoint: str) -> str:
    """Add ``http://`` for local/private hosts and ``https://`` for everything else."""
    if endpoint.startswith(("http://", "https://")):
        return endpoint
    return ("http://" if is_local_endpoint(endpoint) else "https://") + endpoint


def is_local_endpoint(endpoint: str) -> bool:
    """localhost, loopback and RFC 1918 addresses, ``*.local`` and ``*.localhost``."""
    host = _endpoint_host(endpoint)
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.rpartition(":")[0]
    if host == "localhost" or host.endswith((".local", ".localhost")):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(ip in net for net in _LOCAL_NETS)


def _endpoint_host(endpoint: str) -> str:
    host = endpoint.strip().lower()
    for scheme in ("http://", "https://"):
        if host.startswith(scheme):
            host = host[len(scheme):]
    return re.split(r"[/?#]", host, maxsplit=1)[0].rpartition("@")[2]


def _is_minio_host(host: str) -> bool:
    providers = (".amazonaws.com", ".digitaloceanspaces.com", ".backblazeb2.com", ".filebase.com",
                 ".scw.cloud", ".r2.cloudflarestorage.com", "tigris.dev", "t3.storage.dev",
                 ".supabase.co")
    return ":" in host and not any(p in host for p in providers)


def _check_sse_c(url: str, endpoint: str, alg: str, key: str, md5: str,
                 kms_key: str) -> tuple[str, str]:
    """Validate SSE-C the way Litestream's Init does; returns (algorithm, key MD5)."""
    if kms_key:
        raise _error(url, "sseCustomerKey and sseKmsKeyId are mutually exclusive")
    alg = alg or "AES256"
    if alg != "AES256":
        raise _error(url, f"sseCustomerAlgorithm must be AES256, not {alg!r}")
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raise _error(url, "sseCustomerKey must be valid base64") from None
    if len(raw) != 32:
        raise _error(url, f"sseCustomerKey must decode to 32 bytes (256 bits), not {len(raw)}")
    if endpoint.startswith("http://") and not is_local_endpoint(endpoint):
        raise _error(url, "sseCustomerKey requires an https endpoint (http only for local hosts)")
    return alg, md5 or base64.b64encode(hashlib.md5(raw).digest()).decode()


class _Query:
    """Query parameters with Litestream's lookup rules: first value wins, "" means unset."""

    def __init__(self, url: str, query: str) -> None:
        self._url = url
        self._values: dict[str, str] = {}
        for name, value in parse_qsl(query, keep_blank_values=True):
            self._values.setdefault(name, value)

    def get(self, *names: str) -> str:
        for name in names:
            if value := self._values.get(name, ""):
                return value
        return ""

    def bool(self, *names: str) -> bool | None:
        for name in names:
            if raw := self._values.get(name, ""):
                if raw.lower() in _TRUE:
                    return True
                if raw.lower() in _FALSE:
                    return False
                raise _error(self._url, f"{name}={raw!r} is not a boolean "
                                        "(true/false, 1/0, t/f, yes/no)")
        return None

    def int(self, *names: str) -> int | None:
        for name in names:
            if raw := self._values.get(name, ""):
                if not re.fullmatch(r"\+?[0-9]{1,18}", raw) or int(raw) <= 0:
                    raise _error(self._url, f"{name}={raw!r} must be a positive integer")
                return int(raw)
        return None
