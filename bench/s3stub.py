"""A small, fast S3-compatible stand-in for the benchmarks (127.0.0.1 only, no auth).

Why not moto: moto's server reads the whole object for every ranged GET (about 90 ranged GETs/s
on a 20 MB object, far fewer on 200 MB), so it, not the client under test, would be measured.
Here a ranged GET is one ``pread`` of the range.

Path-style requests only. Objects live on disk (``<root>/objects/<sha1 of bucket/key>`` with a
JSON sidecar holding size, ETag, Last-Modified, content type and ``x-amz-meta-*``), so a stand-in
restarted on the same root serves the same replicas. Supported, as boto3 (ltxvfs) and
aws-sdk-go-v2 (litestream, the Go VFS) use them:

* buckets: ``PUT /b`` (create), ``HEAD /b``, ``GET /b?location``, ``DELETE /b``
* ``GET /b?list-type=2`` (ListObjectsV2: prefix, delimiter, start-after, max-keys,
  continuation-token, encoding-type=url) and v1 listings (marker)
* objects: ``PUT`` (``If-None-Match: *`` -> 412 when the key exists), ``GET`` with ``Range``
  (``bytes=a-b``, ``a-``, ``-n``; 416 InvalidRange), ``HEAD``, ``DELETE``
* ``POST /b?delete`` (DeleteObjects), multipart uploads (create, upload part, complete with
  ``If-None-Match``, abort)
* request bodies: ``Content-Length``, ``Transfer-Encoding: chunked``, ``Expect: 100-continue``
  and ``aws-chunked`` (``STREAMING-*`` payloads, signatures ignored)

Run: ``python bench/s3stub.py --root DIR [--port 0]``; it prints ``READY <port>`` on stdout.
"""

from __future__ import annotations

import argparse
import email.utils
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import threading
import time
import urllib.parse
import uuid
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from xml.sax.saxutils import escape

CHUNK = 1 << 20
_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"


@dataclass
class Obj:
    bucket: str
    key: str
    size: int
    etag: str  # quoted
    mtime: float
    content_type: str = "application/octet-stream"
    meta: dict[str, str] = field(default_factory=dict)  # x-amz-meta-* names without the prefix

    @property
    def ident(self) -> str:
        return hashlib.sha1(f"{self.bucket}/{self.key}".encode()).hexdigest()


class S3Error(Exception):
    def __init__(self, status: int, code: str, message: str = "", resource: str = "") -> None:
        super().__init__(message or code)
        self.status, self.code, self.message, self.resource = status, code, message or code, resource


class Store:
    """Buckets and objects on disk, metadata mirrored in memory. Thread-safe."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.objdir = root / "objects"
        self.updir = root / "uploads"
        self.objdir.mkdir(parents=True, exist_ok=True)
        self.updir.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.buckets: set[str] = set()
        self.objects: dict[str, dict[str, Obj]] = {}
        self.uploads: dict[str, dict] = {}
        bfile = root / "buckets.json"
        if bfile.exists():
            self.buckets = set(json.loads(bfile.read_text()))
        for side in self.objdir.glob("*.json"):
            try:
                o = Obj(**json.loads(side.read_text()))
            except (ValueError, TypeError):
                continue
            if (self.objdir / o.ident).exists():
                self.buckets.add(o.bucket)
                self.objects.setdefault(o.bucket, {})[o.key] = o
        for b in self.buckets:
            self.objects.setdefault(b, {})

    def _save_buckets(self) -> None:
        tmp = self.root / "buckets.json.tmp"
        tmp.write_text(json.dumps(sorted(self.buckets)))
        os.replace(tmp, self.root / "buckets.json")

    # -- buckets --------------------------------------------------------------------------------
    def create_bucket(self, b: str) -> None:
        with self.lock:
            if b not in self.buckets:
                self.buckets.add(b)
                self.objects.setdefault(b, {})
                self._save_buckets()

    def delete_bucket(self, b: str) -> None:
        with self.lock:
            self._need_bucket(b)
            if self.objects[b]:
                raise S3Error(409, "BucketNotEmpty", resource=b)
            self.buckets.discard(b)
            del self.objects[b]
            self._save_buckets()

    def _need_bucket(self, b: str) -> None:
        if b not in self.buckets:
            raise S3Error(404, "NoSuchBucket", "The specified bucket does not exist", b)

    def has_bucket(self, b: str) -> bool:
        with self.lock:
            return b in self.buckets

    # -- objects --------------------------------------------------------------------------------
    def get(self, b: str, k: str) -> Obj:
        with self.lock:
            self._need_bucket(b)
            o = self.objects[b].get(k)
        if o is None:
            raise S3Error(404, "NoSuchKey", "The specified key does not exist.", f"/{b}/{k}")
        return o

    def path(self, o: Obj) -> Path:
        return self.objdir / o.ident

    def put_file(self, b: str, k: str, tmp: Path, etag: str, content_type: str,
                 meta: dict[str, str], if_none_match: bool) -> Obj:
        size = tmp.stat().st_size
        with self.lock:
            self._need_bucket(b)
            if if_none_match and k in self.objects[b]:
                tmp.unlink(missing_ok=True)
                raise S3Error(412, "PreconditionFailed",
                              "At least one of the pre-conditions you specified did not hold",
                              f"/{b}/{k}")
            o = Obj(b, k, size, etag, time.time(), content_type or "application/octet-stream", meta)
            os.replace(tmp, self.path(o))
            side = self.objdir / f"{o.ident}.json.tmp"
            side.write_text(json.dumps(asdict(o)))
            os.replace(side, self.objdir / f"{o.ident}.json")
            self.objects[b][k] = o
        return o

    def delete(self, b: str, k: str) -> None:
        with self.lock:
            self._need_bucket(b)
            o = self.objects[b].pop(k, None)
            if o is not None:
                (self.objdir / f"{o.ident}.json").unlink(missing_ok=True)
                self.path(o).unlink(missing_ok=True)

    def copy_prefix(self, b: str, src: str, dst: str) -> int:
        """Bench control: copy every object under ``src`` to the same key under ``dst``
        (hard links: objects are immutable, a PUT replaces the file). Returns the count."""
        n = 0
        with self.lock:
            self._need_bucket(b)
            for o in [o for k, o in self.objects[b].items() if k.startswith(src)]:
                c = Obj(b, dst + o.key[len(src):], o.size, o.etag, time.time(), o.content_type,
                        dict(o.meta))
                if c.key in self.objects[b]:
                    raise S3Error(409, "AlreadyExists", resource=c.key)
                os.link(self.path(o), self.path(c))
                (self.objdir / f"{c.ident}.json").write_text(json.dumps(asdict(c)))
                self.objects[b][c.key] = c
                n += 1
        return n

    def import_dir(self, b: str, prefix: str, src: Path) -> int:
        """Bench control: publish a file:// replica directory (``src/ltx/<level>/*.ltx``, as
        bench/largegen.py writes them) under ``prefix`` with S3 keys
        ``<prefix>/<level %04x>/<name>`` and Litestream's ``litestream-timestamp`` metadata
        (from each file's LTX header). Hard links when possible. Returns the count."""
        n = 0
        for level_dir in sorted((src / "ltx").iterdir()):
            if not level_dir.name.isdigit():
                continue
            for f in sorted(level_dir.glob("*.ltx")):
                with open(f, "rb") as fh:
                    head = fh.read(40)
                ms = int.from_bytes(head[32:40], "big", signed=True)
                ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000))
                ts += (f".{ms % 1000:03d}".rstrip("0") if ms % 1000 else "") + "Z"
                key = f"{prefix}/{int(level_dir.name):04x}/{f.name}"
                tmp = self.tmpfile()
                try:
                    os.link(f, tmp)
                except OSError:
                    shutil.copyfile(f, tmp)
                etag = f'"{hashlib.md5(f"{f}:{f.stat().st_size}".encode()).hexdigest()}"'
                self.put_file(b, key, tmp, etag, "application/octet-stream",
                              {"litestream-timestamp": ts}, False)
                n += 1
        return n

    def delete_prefix(self, b: str, prefix: str) -> int:
        with self.lock:
            self._need_bucket(b)
            keys = [k for k in self.objects[b] if k.startswith(prefix)]
        for k in keys:
            self.delete(b, k)
        return len(keys)

    def listing(self, b: str) -> list[Obj]:
        with self.lock:
            self._need_bucket(b)
            return sorted(self.objects[b].values(), key=lambda o: o.key)

    def tmpfile(self) -> Path:
        return self.updir / f"tmp-{uuid.uuid4().hex}"


def _http_date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "s3stub/1"
    store: Store  # set on the subclass

    def log_message(self, fmt: str, *args) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        # no Nagle: headers and body go out as separate writes, and a delayed ACK would
        # otherwise add ~40 ms to every response
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # -- plumbing -------------------------------------------------------------------------------
    def _parse(self) -> tuple[str, str, dict[str, str]]:
        u = urllib.parse.urlsplit(self.path)
        q = {k: v[0] for k, v in urllib.parse.parse_qs(u.query, keep_blank_values=True).items()}
        path = urllib.parse.unquote(u.path)
        parts = path.lstrip("/").split("/", 1)
        bucket = parts[0]
        key = parts[1] if len(parts) > 1 else ""
        return bucket, key, q

    def _body_to(self, sink) -> int:
        """Copy the request body into ``sink.write``; returns bytes written. Handles
        Content-Length, chunked transfer encoding and aws-chunked payloads."""
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            raw = self._read_chunked()
        else:
            n = int(self.headers.get("Content-Length") or 0)
            raw = None
            if not self._aws_chunked():
                total = 0
                while total < n:
                    buf = self.rfile.read(min(CHUNK, n - total))
                    if not buf:
                        raise S3Error(400, "IncompleteBody")
                    sink(buf)
                    total += len(buf)
                return total
            raw = self.rfile.read(n)
        if self._aws_chunked():
            raw = self._decode_aws_chunked(raw)
        sink(raw)
        return len(raw)

    def _aws_chunked(self) -> bool:
        sha = self.headers.get("x-amz-content-sha256") or ""
        ce = (self.headers.get("Content-Encoding") or "").lower()
        return sha.startswith("STREAMING-") or "aws-chunked" in ce

    def _read_chunked(self) -> bytes:
        out = bytearray()
        for _ in range(10_000_000):
            line = self.rfile.readline(65537)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass
                break
            out += self.rfile.read(size)
            self.rfile.readline(65537)
        return bytes(out)

    @staticmethod
    def _decode_aws_chunked(raw: bytes) -> bytes:
        out = bytearray()
        pos = 0
        while pos < len(raw):
            eol = raw.index(b"\r\n", pos)
            size = int(raw[pos:eol].split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                break
            out += raw[pos:pos + size]
            pos += size + 2
        return bytes(out)

    def _read_body(self) -> bytes:
        parts: list[bytes] = []
        self._body_to(parts.append)
        return b"".join(parts)

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str | None = "application/xml") -> None:
        self.send_response(status)
        self.send_header("x-amz-request-id", uuid.uuid4().hex[:16].upper())
        if content_type and body:
            self.send_header("Content-Type", content_type)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, e: S3Error) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{e.code}</Code>'
                f"<Message>{escape(e.message)}</Message><Resource>{escape(e.resource)}"
                f"</Resource><RequestId>stub</RequestId></Error>").encode()
        self._send(e.status, b"" if self.command == "HEAD" else body)

    def _dispatch(self) -> None:
        try:
            if self.path.startswith("/__bench__/"):
                self._bench_control()
                return
            bucket, key, q = self._parse()
            if not bucket:
                self._list_buckets()
            elif not key:
                self._bucket_op(bucket, q)
            else:
                self._object_op(bucket, key, q)
        except S3Error as e:
            # drain an unread body so the connection stays usable
            self._error(e)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as e:  # pragma: no cover - a bug in the stub
            print(f"s3stub: {self.command} {self.path}: {e!r}", file=sys.stderr, flush=True)
            self._error(S3Error(500, "InternalError", repr(e)))

    def _bench_control(self) -> None:
        """``POST /__bench__/copy?bucket=&src=&dst=`` and ``POST /__bench__/delete?bucket=&prefix=``
        (the harness's fresh replica per write run), ``POST /__bench__/import?bucket=&prefix=&dir=``
        (a generated file:// replica published under a prefix); not S3."""
        u = urllib.parse.urlsplit(self.path)
        q = {k: v[0] for k, v in urllib.parse.parse_qs(u.query, keep_blank_values=True).items()}
        self._read_body()
        if u.path == "/__bench__/copy" and self.command == "POST":
            n = self.store.copy_prefix(q["bucket"], q["src"], q["dst"])
        elif u.path == "/__bench__/delete" and self.command == "POST":
            n = self.store.delete_prefix(q["bucket"], q["prefix"])
        elif u.path == "/__bench__/import" and self.command == "POST":
            self.store.create_bucket(q["bucket"])
            n = self.store.import_dir(q["bucket"], q["prefix"].rstrip("/"), Path(q["dir"]))
        else:
            raise S3Error(404, "NoSuchControl", resource=u.path)
        self._send(200, json.dumps({"objects": n}).encode(), content_type="application/json")

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _dispatch  # noqa: N815

    # -- bucket level ---------------------------------------------------------------------------
    def _list_buckets(self) -> None:
        with self.store.lock:
            names = sorted(self.store.buckets)
        items = "".join(f"<Bucket><Name>{escape(n)}</Name><CreationDate>{_iso(0)}</CreationDate>"
                        "</Bucket>" for n in names)
        self._send(200, (f'<?xml version="1.0" encoding="UTF-8"?>\n<ListAllMyBucketsResult '
                         f'xmlns="{_XMLNS}"><Buckets>{items}</Buckets></ListAllMyBucketsResult>'
                         ).encode())

    def _bucket_op(self, b: str, q: dict[str, str]) -> None:
        st = self.store
        if self.command == "PUT":
            self._read_body()
            st.create_bucket(b)
            self._send(200, headers={"Location": f"/{b}"})
        elif self.command == "HEAD":
            if not st.has_bucket(b):
                raise S3Error(404, "NoSuchBucket", resource=b)
            self._send(200, headers={"x-amz-bucket-region": "us-east-1"})
        elif self.command == "DELETE":
            st.delete_bucket(b)
            self._send(204)
        elif self.command == "POST" and "delete" in q:
            self._delete_objects(b)
        elif self.command == "GET" and "location" in q:
            if not st.has_bucket(b):
                raise S3Error(404, "NoSuchBucket", resource=b)
            self._send(200, f'<?xml version="1.0" encoding="UTF-8"?>\n<LocationConstraint '
                            f'xmlns="{_XMLNS}"/>'.encode())
        elif self.command == "GET":
            self._list(b, q)
        else:
            raise S3Error(405, "MethodNotAllowed")

    def _list(self, b: str, q: dict[str, str]) -> None:
        v2 = q.get("list-type") == "2"
        prefix = q.get("prefix", "")
        delim = q.get("delimiter", "")
        max_keys = max(0, min(int(q.get("max-keys") or 1000), 1000))
        enc = q.get("encoding-type") == "url"
        if v2:
            after = q.get("continuation-token") or q.get("start-after") or ""
            if q.get("continuation-token"):
                after = urllib.parse.unquote(after)
        else:
            after = q.get("marker", "")
        objs = [o for o in self.store.listing(b) if o.key.startswith(prefix) and o.key > after]
        contents: list[Obj] = []
        prefixes: list[str] = []
        last = ""
        truncated = False
        for o in objs:
            if delim:
                rest = o.key[len(prefix):]
                i = rest.find(delim)
                if i >= 0:
                    cp = prefix + rest[:i + len(delim)]
                    if prefixes and prefixes[-1] == cp:
                        last = o.key
                        continue
                    if len(contents) + len(prefixes) >= max_keys:
                        truncated = True
                        break
                    prefixes.append(cp)
                    last = o.key
                    continue
            if len(contents) + len(prefixes) >= max_keys:
                truncated = True
                break
            contents.append(o)
            last = o.key

        def k(s: str) -> str:
            return escape(urllib.parse.quote(s, safe="/") if enc else s)

        out = [f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{_XMLNS}">',
               f"<Name>{escape(b)}</Name><Prefix>{k(prefix)}</Prefix>",
               f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{'true' if truncated else 'false'}"
               "</IsTruncated>"]
        if delim:
            out.append(f"<Delimiter>{k(delim)}</Delimiter>")
        if enc:
            out.append("<EncodingType>url</EncodingType>")
        if v2:
            out.append(f"<KeyCount>{len(contents) + len(prefixes)}</KeyCount>")
            if q.get("continuation-token"):
                out.append(f"<ContinuationToken>{escape(q['continuation-token'])}"
                           "</ContinuationToken>")
            if q.get("start-after"):
                out.append(f"<StartAfter>{k(q['start-after'])}</StartAfter>")
            if truncated:
                out.append(f"<NextContinuationToken>{escape(urllib.parse.quote(last, safe=''))}"
                           "</NextContinuationToken>")
        else:
            out.append(f"<Marker>{k(after)}</Marker>")
            if truncated:
                out.append(f"<NextMarker>{k(last)}</NextMarker>")
        for o in contents:
            out.append(f"<Contents><Key>{k(o.key)}</Key><LastModified>{_iso(o.mtime)}"
                       f"</LastModified><ETag>{escape(o.etag)}</ETag><Size>{o.size}</Size>"
                       "<StorageClass>STANDARD</StorageClass></Contents>")
        for p in prefixes:
            out.append(f"<CommonPrefixes><Prefix>{k(p)}</Prefix></CommonPrefixes>")
        out.append("</ListBucketResult>")
        self._send(200, "".join(out).encode())

    def _delete_objects(self, b: str) -> None:
        body = self._read_body().decode()
        quiet = "<Quiet>true</Quiet>" in body
        keys = [_unxml(m) for m in re.findall(r"<Key>(.*?)</Key>", body, re.S)]
        for key in keys:
            self.store.delete(b, key)
        deleted = "" if quiet else "".join(f"<Deleted><Key>{escape(k)}</Key></Deleted>"
                                           for k in keys)
        self._send(200, (f'<?xml version="1.0" encoding="UTF-8"?>\n<DeleteResult '
                         f'xmlns="{_XMLNS}">{deleted}</DeleteResult>').encode())

    # -- object level ---------------------------------------------------------------------------
    def _meta_from_headers(self) -> dict[str, str]:
        return {k.lower()[len("x-amz-meta-"):]: v for k, v in self.headers.items()
                if k.lower().startswith("x-amz-meta-")}

    def _object_op(self, b: str, k: str, q: dict[str, str]) -> None:
        cmd = self.command
        if cmd in ("GET", "HEAD"):
            self._get(b, k, head=cmd == "HEAD")
        elif cmd == "PUT" and "uploadId" in q:
            self._upload_part(q["uploadId"], int(q.get("partNumber", "0")))
        elif cmd == "PUT":
            if self.headers.get("x-amz-copy-source"):
                raise S3Error(501, "NotImplemented", "copy is not supported by the stub")
            if not self.store.has_bucket(b):
                self._read_body()
                raise S3Error(404, "NoSuchBucket", resource=b)
            tmp = self.store.tmpfile()
            md5 = hashlib.md5()
            with open(tmp, "wb") as f:
                def sink(buf: bytes) -> None:
                    md5.update(buf)
                    f.write(buf)
                self._body_to(sink)
            o = self.store.put_file(b, k, tmp, f'"{md5.hexdigest()}"',
                                    self.headers.get("Content-Type", ""),
                                    self._meta_from_headers(),
                                    (self.headers.get("If-None-Match") or "").strip() == "*")
            self._send(200, headers={"ETag": o.etag})
        elif cmd == "DELETE" and "uploadId" in q:
            up = self.store.uploads.pop(q["uploadId"], None)
            if up:
                shutil.rmtree(up["dir"], ignore_errors=True)
            self._send(204)
        elif cmd == "DELETE":
            self.store.delete(b, k)
            self._send(204)
        elif cmd == "POST" and "uploads" in q:
            self._read_body()
            if not self.store.has_bucket(b):
                raise S3Error(404, "NoSuchBucket", resource=b)
            uid = uuid.uuid4().hex
            d = self.store.updir / uid
            d.mkdir()
            self.store.uploads[uid] = {"bucket": b, "key": k, "dir": d,
                                       "meta": self._meta_from_headers(),
                                       "ctype": self.headers.get("Content-Type", "")}
            self._send(200, (f'<?xml version="1.0" encoding="UTF-8"?>\n<InitiateMultipartUploadResult'
                             f' xmlns="{_XMLNS}"><Bucket>{escape(b)}</Bucket><Key>{escape(k)}</Key>'
                             f"<UploadId>{uid}</UploadId></InitiateMultipartUploadResult>").encode())
        elif cmd == "POST" and "uploadId" in q:
            self._complete(b, k, q["uploadId"])
        else:
            raise S3Error(405, "MethodNotAllowed")

    def _get(self, b: str, k: str, head: bool) -> None:
        o = self.store.get(b, k)
        headers = {"ETag": o.etag, "Last-Modified": _http_date(o.mtime), "Accept-Ranges": "bytes",
                   "Content-Type": o.content_type}
        for mk, mv in o.meta.items():
            headers[f"x-amz-meta-{mk}"] = mv
        start, end = 0, o.size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng and not head:
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), o.size - 1) if m.group(2) else o.size - 1
                else:
                    start = max(0, o.size - int(m.group(2)))
                if start >= o.size or start > end:
                    raise S3Error(416, "InvalidRange", "The requested range is not satisfiable",
                                  f"/{b}/{k}")
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{o.size}"
        length = max(0, end - start + 1)
        self.send_response(status)
        self.send_header("x-amz-request-id", "STUB")
        for hk, hv in headers.items():
            self.send_header(hk, hv)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if head or length == 0:
            return
        fd = os.open(self.store.path(o), os.O_RDONLY)
        try:
            pos = start
            while pos <= end:
                buf = os.pread(fd, min(CHUNK, end + 1 - pos), pos)
                if not buf:
                    break
                self.wfile.write(buf)
                pos += len(buf)
        finally:
            os.close(fd)

    def _upload_part(self, uid: str, n: int) -> None:
        up = self.store.uploads.get(uid)
        if up is None:
            self._read_body()
            raise S3Error(404, "NoSuchUpload")
        md5 = hashlib.md5()
        tmp = up["dir"] / f"{n:05d}.tmp"
        with open(tmp, "wb") as f:
            def sink(buf: bytes) -> None:
                md5.update(buf)
                f.write(buf)
            self._body_to(sink)
        os.replace(tmp, up["dir"] / f"{n:05d}")
        (up["dir"] / f"{n:05d}.md5").write_text(md5.hexdigest())
        self._send(200, headers={"ETag": f'"{md5.hexdigest()}"'})

    def _complete(self, b: str, k: str, uid: str) -> None:
        body = self._read_body().decode()
        up = self.store.uploads.get(uid)
        if up is None:
            raise S3Error(404, "NoSuchUpload")
        nums = [int(x) for x in re.findall(r"<PartNumber>(\d+)</PartNumber>", body)]
        tmp = self.store.tmpfile()
        digests = b""
        with open(tmp, "wb") as out:
            for n in nums:
                p = up["dir"] / f"{n:05d}"
                if not p.exists():
                    raise S3Error(400, "InvalidPart")
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, CHUNK)
                digests += bytes.fromhex((up["dir"] / f"{n:05d}.md5").read_text())
        etag = f'"{hashlib.md5(digests).hexdigest()}-{len(nums)}"'
        o = self.store.put_file(b, k, tmp, etag, up["ctype"], up["meta"],
                                (self.headers.get("If-None-Match") or "").strip() == "*")
        self.store.uploads.pop(uid, None)
        shutil.rmtree(up["dir"], ignore_errors=True)
        self._send(200, (f'<?xml version="1.0" encoding="UTF-8"?>\n<CompleteMultipartUploadResult '
                         f'xmlns="{_XMLNS}"><Bucket>{escape(b)}</Bucket><Key>{escape(k)}</Key>'
                         f"<ETag>{escape(o.etag)}</ETag></CompleteMultipartUploadResult>").encode())


def _unxml(s: str) -> str:
    return (s.replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", '"')
            .replace("&apos;", "'").replace("&amp;", "&"))


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128


def make_server(root: Path, port: int = 0, host: str = "127.0.0.1") -> Server:
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("the stub listens on loopback only")
    store = Store(root)
    handler = type("BoundHandler", (Handler,), {"store": store})
    return Server((host, port), handler)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--bucket", action="append", default=[], help="create this bucket at start")
    args = ap.parse_args(argv)
    srv = make_server(args.root, args.port)
    for b in args.bucket:
        srv.RequestHandlerClass.store.create_bucket(b)  # type: ignore[attr-defined]
    print(f"READY {srv.server_address[1]}", flush=True)
    try:
        srv.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
