"""``python bench/run.py --suite large``: generated 1-40 GB replicas (issue 17, item 3).

    python bench/run.py --suite large                          # 1g,4g
    python bench/run.py --suite large --datasets 1g,4g,40g

Datasets come from bench/largegen.py (a hand-laid table b-tree written as LTX files; cached under
``DATA/large/<name>``), published in the S3 stand-in under ``large-<name>-r<recipe>`` (hard
links, with ``litestream-timestamp`` metadata) and read as they are as ``file://`` replicas.

Measurements, each a fresh child process (bench/child.py, workload ``large``:
bench/largechild.py):

* ``read`` — per dataset x transport (``s3``: the stand-in behind the 20 ms proxy; ``file``:
  ``file://``) x system (ltxvfs, go; ``local`` = a ``litestream restore`` of the replica, up to
  ``--local-max-pages``): open -> first point lookup (a random row), then the highest rowid (a
  leaf far from page 1), then ``--large-lookups`` random lookups; VmRSS/VmHWM from
  /proc/self/status before the open and after the first lookup (RSS growth, peak, bytes per
  page); the proxy's requests and bytes; then time travel (``PRAGMA litestream_time`` to a
  moment between TXID 10 and 11: snapshot + L0 2..10) and lookups of rows changed since;
* ``poll`` — on a fresh copy of the replica (``--poll-datasets``): open, look up a row, append
  the generator's poll file (one L0 file, TXID latest+1; S3: PUT to the stand-in directly,
  file: rename into ``ltx/0``), time until a lookup returns the new row, requests meanwhile;
* ``hydrate`` — (``--hydrate-datasets``, S3): ltxvfs ``hydration_path=``, Go
  ``LITESTREAM_HYDRATION_ENABLED``/``_PATH``; until ``litestream_hydration_progress`` = 100:
  time, bytes downloaded, peak RSS, hydrated file size.

Every lookup checks the row's blob prefix against the generator's: a wrong page fails the run.
Children are bounded by ``--large-timeout`` and ``--rss-cap-mb`` (killed, and reported so).
The report goes between ``<!-- BEGIN/END GENERATED large -->`` in docs/benchmarks.md, the raw
results to bench/results/large.json.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from common import (
    BENCH_DIR,
    LITESTREAM_BIN,
    child_env,
    export_ltxvfs,
    s3_url,
    start_proxy,
    start_stub,
)
from largechild import BUCKET

TRAVEL_TXID = 10


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def prefix_for(ds: str, recipe: int) -> str:
    return f"large-{ds}-r{recipe}"


def _stub_post(stub_url: str, op: str, **q: str) -> dict:
    req = urllib.request.Request(f"{stub_url}/__bench__/{op}?{urllib.parse.urlencode(q)}",
                                 data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def publish(m: dict, prefix: str, stub_url: str) -> None:
    """The generated replica in the stand-in under ``prefix`` (unless already there)."""
    import dataset
    have = {(f["level"], f["min"], f["max"], f["size"]) for f in dataset.ltx_files(stub_url,
                                                                                   prefix)}
    want = {(f["level"], f["min"], f["max"], f["size"]) for f in m["files"]}
    if have == want:
        return
    _stub_post(stub_url, "delete", bucket=BUCKET, prefix=prefix + "/")
    _stub_post(stub_url, "import", bucket=BUCKET, prefix=prefix, dir=m["replica"])


def restore_local(m: dict, out: Path) -> Path:
    if out.exists() and out.stat().st_size == m["pages"] * m["page_size"]:
        return out
    out.unlink(missing_ok=True)
    subprocess.run([LITESTREAM_BIN, "restore", "-o", str(out), "file://" + m["replica"]],
                   check=True, env=child_env(), capture_output=True, timeout=1800)
    return out


def lookup_plan(m: dict, seed: int, n: int) -> dict:
    """Row ids to look up and the prefix each must read, as of the latest TXID."""
    import largegen
    spec = largegen.Spec(**m["spec"])
    rows, latest = m["rows"], m["latest_txid"]

    def want(r: int, txid: int = latest) -> str:
        return largegen.row_prefix(r, largegen.row_txid(spec, rows, r, txid)).decode()

    rng = random.Random(seed)
    first = rng.randint(rows // 4, 3 * rows // 4)
    randoms = [rng.randint(1, rows) for _ in range(n)]
    changed = sorted({r for t, rs in m["changes"].items() for r in rs
                      if TRAVEL_TXID < int(t) <= latest
                      and largegen.row_txid(spec, rows, r, TRAVEL_TXID)
                      != largegen.row_txid(spec, rows, r, latest)})[:3]
    moment = (largegen.txid_time_ms(TRAVEL_TXID) + 30_000) / 1000
    when = dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    poll_row = m["changes"][str(m["spec"]["history"] + 2)][0]
    return {"first": [first, want(first)], "high": [rows, want(rows)],
            "randoms": [[r, want(r)] for r in randoms],
            "travel": {"time": when, "txid": TRAVEL_TXID,
                       "rows": [[r, want(r, TRAVEL_TXID)] for r in changed]},
            "poll_row": [poll_row, want(poll_row), largegen.row_prefix(
                poll_row, m["spec"]["history"] + 2).decode()]}


def _link_tree(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    for root, _dirs, files in os.walk(src):
        r = Path(root)
        (dst / r.relative_to(src)).mkdir(parents=True, exist_ok=True)
        for f in files:
            os.link(r / f, dst / r.relative_to(src) / f)


def main(args, argv: list[str] | None, run) -> int:
    import largegen
    t_start = time.monotonic()
    datasets = args.datasets.split(",") if args.datasets else ["1g", "4g"]
    for ds in datasets:
        if ds not in largegen.SIZES:
            raise SystemExit(f"unknown large dataset {ds!r}; known: {', '.join(largegen.SIZES)}")
    systems = [s for s in args.systems.split(",") if s]
    transports = [t for t in args.transports.split(",") if t]
    poll_ds = [d for d in args.poll_datasets.split(",") if d in datasets]
    hyd_ds = [d for d in args.hydrate_datasets.split(",") if d in datasets]
    data = args.data_dir
    (data / "logs").mkdir(parents=True, exist_ok=True)
    work = data / "work"
    work.mkdir(exist_ok=True)
    label, pythonpath = export_ltxvfs(args.ltxvfs, data / "src")
    _log(f"ltxvfs under test: {label}")
    stub = start_stub(data / "s3", data / "logs" / "s3stub.log")
    proxy = None
    results: list[dict] = []
    manifests: dict[str, dict] = {}
    timing: dict[str, dict] = {}
    cap_kb = int(args.rss_cap_mb * 1024)
    try:
        for ds in datasets:
            t0 = time.monotonic()
            m = largegen.generate(largegen.spec_for(ds), data / "large" / ds, rebuild=args.rebuild,
                                  progress=lambda s, ds=ds: _log(f"{ds}: {s}"))
            m["prefix"] = prefix_for(ds, largegen.RECIPE)
            publish(m, m["prefix"], stub.url)
            t1 = time.monotonic()
            if "local" in systems and m["pages"] <= args.local_max_pages:
                m["local_db"] = str(restore_local(m, data / "large" / ds / "local.db"))
            manifests[ds] = m
            timing[ds] = {"prepare_s": t1 - t0, "local_restore_s": time.monotonic() - t1}
            _log(f"{ds}: ready ({m['pages']:,} pages, {m['ltx_bytes'] / 1e6:.0f} MB of LTX; "
                 f"generate/publish {t1 - t0:.1f}s, local copy {time.monotonic() - t1:.1f}s)")
        proxy = start_proxy(stub.url, args.latency_ms, data / "logs" / "proxy.log")
        _log(f"stand-in {stub.url}, proxy {proxy.url} ({args.latency_ms:g} ms)")

        def child(ds: str, phase: str, system: str, transport: str, run_no: int,
                  replica_prefix: str | None = None, replica_dir: str | None = None,
                  extra_env: dict | None = None, tmp: Path | None = None) -> dict:
            m = manifests[ds]
            prefix = replica_prefix or m["prefix"]
            if transport == "s3":
                url, endpoint = s3_url(proxy.url, BUCKET, prefix), proxy.url
            else:
                url, endpoint = "file://" + (replica_dir or m["replica"]), None
            params = dict(lookup_plan(m, 1000 * run_no + 17, args.large_lookups),
                          phase=phase, transport=transport, pages=m["pages"],
                          poll_file=str(Path(m["replica"]).parent / m["poll"]["path"]),
                          replica_dir=replica_dir or m["replica"])
            spec = {"dataset": {"facts": {"max_id": m["rows"]},
                                "local_db": m.get("local_db", "")},
                    "replica_url": url, "endpoint": endpoint, "params": params,
                    "seed": 1000 * run_no + 7, "stub": stub.url, "replica_prefix": prefix,
                    "tmpdir": str(tmp or work)}
            env = run.child_env_for(system, url, pythonpath, extra_env)
            t = time.monotonic()
            res = run.run_child(system, "large", spec, work, env, args.large_timeout,
                                rss_cap_kb=cap_kb)
            timing[ds]["children_s"] = timing[ds].get("children_s", 0) + time.monotonic() - t
            results.append({"run": run_no, "dataset": ds, "phase": phase, "system": system,
                            "transport": transport, "result": res})
            _log(f"{ds} {phase:7} {transport:4} {system:6} {_brief(res)}")
            return res

        for r in range(args.runs):
            for ds in datasets:
                for transport in transports:
                    for system in systems:
                        if system != "local":
                            child(ds, "read", system, transport, r)
                if "local" in systems and manifests[ds].get("local_db"):
                    child(ds, "read", "local", "local", r)
                if r > 0:
                    continue  # poll and hydration: once (their cost is not what varies)
                for transport in (transports if ds in poll_ds else []):
                    for system in [s for s in systems if s != "local"]:
                        tag = f"poll-{r}-{system}-{transport}-{os.getpid()}"
                        prefix, rdir = None, None
                        if transport == "s3":
                            prefix = f"{manifests[ds]['prefix']}-{tag}"
                            _stub_post(stub.url, "delete", bucket=BUCKET, prefix=prefix + "/")
                            _stub_post(stub.url, "copy", bucket=BUCKET,
                                       src=manifests[ds]["prefix"] + "/", dst=prefix + "/")
                        else:
                            rdir = str(work / tag)
                            _link_tree(Path(manifests[ds]["replica"]), Path(rdir))
                        try:
                            child(ds, "poll", system, transport, r, replica_prefix=prefix,
                                  replica_dir=rdir)
                        finally:
                            if prefix:
                                _stub_post(stub.url, "delete", bucket=BUCKET,
                                           prefix=prefix + "/")
                            if rdir:
                                shutil.rmtree(rdir, ignore_errors=True)
                if ds in hyd_ds and "s3" in transports:
                    for system in [s for s in systems if s != "local"]:
                        tmp = work / f"hyd-{r}-{system}"
                        shutil.rmtree(tmp, ignore_errors=True)
                        tmp.mkdir(parents=True)
                        extra = ({"LITESTREAM_HYDRATION_ENABLED": "true",
                                  "LITESTREAM_HYDRATION_PATH": str(tmp / "hydrated.db")}
                                 if system == "go" else None)
                        try:
                            child(ds, "hydrate", system, "s3", r, extra_env=extra, tmp=tmp)
                        finally:
                            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if proxy is not None:
            proxy.stop()
        stub.stop()

    machine, software = run.machine_info()
    meta = {"command": "python bench/run.py " + " ".join(argv if argv is not None
                                                        else sys.argv[1:]),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine, "software": software + f"; ltxvfs {label}",
            "latency_ms": args.latency_ms, "runs": args.runs, "timing": timing,
            "wall_s": time.monotonic() - t_start, "rss_cap_mb": args.rss_cap_mb,
            "timeout_s": args.large_timeout, "lookups": args.large_lookups}
    body = render(meta, results, datasets, manifests)
    print(body)
    out_json = args.json or (BENCH_DIR / "results" / "large.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"meta": meta, "results": results,
                                    "manifests": {k: {kk: vv for kk, vv in v.items()
                                                      if kk != "changes"}
                                                  for k, v in manifests.items()}},
                                   indent=1, default=str))
    if str(args.doc) != "-":
        run.write_doc(args.doc, "large", body)
        _log(f"wrote {args.doc} and {out_json}")
    _log(f"total {time.monotonic() - t_start:.0f}s")
    return 0


def _brief(res: dict) -> str:
    if "error" in res:
        return "ERROR " + res["error"].strip().splitlines()[0][:300]
    keys = ("first_row_s", "open_s", "high_ms", "rand_median_ms", "rss_growth_kb", "requests",
            "travel_s", "visible_s", "time_s", "bytes")
    return " ".join(f"{k}={res[k]:.3f}" if isinstance(res[k], float) else f"{k}={res[k]}"
                    for k in keys if k in res and res[k] is not None)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

COLUMNS = (("ltxvfs", "s3"), ("go", "s3"), ("ltxvfs", "file"), ("go", "file"),
           ("local", "local"))
COL_LABEL = {("ltxvfs", "s3"): "ltxvfs, S3 20 ms", ("go", "s3"): "Go, S3 20 ms",
             ("ltxvfs", "file"): "ltxvfs, file://", ("go", "file"): "Go, file://",
             ("local", "local"): "local file"}

READ_ROWS = (
    ("first_row_s", "open → first row (random row)", "s"),
    ("open_s", "of which open", "s"),
    ("high_ms", "then: highest rowid (a leaf far from page 1)", "ms"),
    ("rand_median_ms", "then: random lookups, median", "ms"),
    ("rand_max_ms", "then: random lookups, worst", "ms"),
    ("requests", "requests, open + first row", "n"),
    ("bytes", "bytes downloaded, open + first row", "B"),
    ("rand_requests", "requests per random lookup", "n"),
    ("rss_growth_kb", "RSS growth, open + first row", "KiB"),
    ("bytes_per_page", "RSS growth per page of the database", "B/page"),
    ("peak_growth_kb", "peak RSS growth (VmHWM after the first row − RSS before the open)",
     "KiB"),
    ("hwm_after_kb", "peak RSS of the process (VmHWM) after the first row", "KiB"),
    ("travel_s", f"time travel to TXID {TRAVEL_TXID} (PRAGMA litestream_time) + 3 lookups", "s"),
    ("travel_requests", "requests of the time travel", "n"),
    ("hwm_travel_kb", "peak RSS of the process after the time travel", "KiB"),
    ("reopen_s", "close, open again in the same process → a random row", "s"),
    ("reopen_requests", "requests of that reopen", "n"),
)
POLL_ROWS = (
    ("visible_s", "new L0 file appears → a lookup returns the new row", "s"),
    ("requests", "requests meanwhile", "n"),
)
HYD_ROWS = (
    ("time_s", "open → hydration 100 %", "s"),
    ("first_row_s", "open → first row (during hydration)", "s"),
    ("bytes", "bytes downloaded", "B"),
    ("file_bytes", "hydrated file size", "B"),
    ("hwm_kb", "peak RSS (VmHWM)", "KiB"),
    ("requests", "requests", "n"),
)


def _fmt(v, unit: str) -> str:
    if v is None:
        return "–"
    if unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    if unit == "ms":
        return f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"
    if unit == "KiB":
        return f"{v / 1024:.0f} MiB" if abs(v) >= 10 * 1024 else f"{v / 1024:.1f} MiB"
    if unit == "B":
        for u in ("B", "KB", "MB", "GB"):
            if abs(v) < 1000 or u == "GB":
                return f"{v:.0f} {u}" if u == "B" else f"{v:.1f} {u}"
            v /= 1000
    if unit == "B/page":
        return f"{v:.0f} B"
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 or abs(v) >= 100 else f"{v:.1f}"


def _summ(results: list[dict], ds: str, phase: str) -> dict:
    """(system, transport) -> {metric: median, "errors": [...]}."""
    out: dict = {}
    for r in results:
        if r["dataset"] != ds or r["phase"] != phase:
            continue
        out.setdefault((r["system"], r["transport"]), []).append(r["result"])
    summ = {}
    for key, rs in out.items():
        ok = [x for x in rs if "error" not in x]
        s: dict = {"errors": [x["error"] for x in rs if "error" in x], "runs": len(ok),
                   "incomplete": any(x.get("incomplete") for x in ok)}
        for k in {k for x in ok for k, v in x.items() if isinstance(v, (int, float))
                  and not isinstance(v, bool)}:
            vals = [x[k] for x in ok if x.get(k) is not None]
            s[k] = statistics.median(vals) if vals else None
        summ[key] = s
    return summ


def _table(summ: dict, rows: tuple, cols: tuple) -> list[str]:
    cols = [c for c in cols if c in summ]
    if not cols:
        return []
    lines = ["| | " + " | ".join(COL_LABEL[c] for c in cols) + " |",
         "|---|" + "---|" * len(cols)]
    for key, label, unit in rows:
        cells = []
        for c in cols:
            s = summ[c]
            if s["runs"] == 0:
                cells.append("failed")
                continue
            cell = _fmt(s.get(key), unit)
            if s.get("incomplete") and key in ("visible_s", "time_s"):
                cell = "> " + cell
            cells.append(cell)
        if all(x == "–" for x in cells):
            continue
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _ratio(a, b) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}×"


def targets(summ: dict, ds: str) -> list[str]:
    """Issue 17's targets beside the figures."""
    rows = []

    def get(sys_: str, tr: str, k: str):
        return summ.get((sys_, tr), {}).get(k)

    def line(label: str, a, b, ok: bool | None, shown: str) -> None:
        verdict = "–" if ok is None else ("met" if ok else "**missed**")
        rows.append(f"| {label} | {shown} | {verdict} |")
        del a, b

    if ds == "4g":
        for tr, name in (("s3", "20 ms"), ("file", "file://")):
            a, b = get("ltxvfs", tr, "first_row_s"), get("go", tr, "first_row_s")
            ok = None if a is None or b is None else a <= 0.3 * b
            line(f"open → first row ≤ 0.3 × Go ({name})", a, b, ok,
                 f"{_fmt(a, 's')} vs {_fmt(b, 's')} = {_ratio(a, b)}")
            a, b = get("ltxvfs", tr, "rss_growth_kb"), get("go", tr, "rss_growth_kb")
            ok = None if a is None or b is None else a <= 0.2 * b
            line(f"RSS growth ≤ 0.2 × Go's ({name})", a, b, ok,
                 f"{_fmt(a, 'KiB')} vs {_fmt(b, 'KiB')} = {_ratio(a, b)}")
    if ds == "40g":
        a = get("ltxvfs", "s3", "first_row_s")
        line("open → first row ≤ 2 s (20 ms)", a, 2, None if a is None else a <= 2.0,
             _fmt(a, "s"))
        a = get("ltxvfs", "s3", "rss_growth_kb")
        line("RSS growth ≤ 400 MiB (20 ms)", a, 400, None if a is None else a <= 400 * 1024,
             _fmt(a, "KiB"))
    for tr in ("s3", "file"):
        a = get("ltxvfs", tr, "bytes_per_page")
        if a is not None:
            line(f"memory ≤ 32 B/page ({'20 ms' if tr == 's3' else 'file://'})", a, 32, a <= 32,
                 f"{a:.0f} B/page")
    if not rows:
        return []
    return ["| issue-17 target | figure | |", "|---|---|---|", *rows]


def render(meta: dict, results: list[dict], datasets: list[str], manifests: dict) -> str:
    lines: list[str] = []
    lines.append(f"Command: `{meta['command']}`  ")
    lines.append(f"Date: {meta['date']}  ")
    lines.append(f"Machine: {meta['machine']}  ")
    lines.append(f"Software: {meta['software']}  ")
    lines.append(f"Setup: S3 = the stand-in behind the latency proxy ({meta['latency_ms']:g} ms per "
             f"request); file:// = the same LTX files as a directory; {meta['runs']} run(s) "
             f"of the read children, medians (poll and hydration: one run); each "
             f"measurement a fresh process, bounded by {meta['timeout_s']:.0f} s "
             f"and {meta['rss_cap_mb']:.0f} MB of RSS; {meta['lookups']} random lookups; "
             f"wall time {meta['wall_s']:.0f} s.")
    lines.append("")
    for ds in datasets:
        m = manifests[ds]
        tm = meta["timing"].get(ds, {})
        lines.append(f"#### `{ds}`: {m['pages']:,} pages × 4 KiB = "
                 f"{m['pages'] * m['page_size'] / 1e9:.1f} GB, {m['rows']:,} rows; "
                 f"{m['ltx_bytes'] / 1e6:.0f} MB of LTX (snapshot + L1 + {m['spec']['history']} L0)")
        lines.append("")
        lines.append(f"Generated in {m['build_seconds']} s (cached afterwards); measurements "
                 f"{tm.get('children_s', 0):.0f} s"
                 + (f", local copy restored in {tm['local_restore_s']:.0f} s"
                    if tm.get("local_restore_s", 0) > 1 else "") + ".")
        lines.append("")
        summ = _summ(results, ds, "read")
        lines += _table(summ, READ_ROWS, COLUMNS)
        lines.append("")
        tg = targets(summ, ds)
        if tg:
            lines += tg
            lines.append("")
        ps = _summ(results, ds, "poll")
        if ps:
            lines.append(f"Poll (`{ds}`): one new L0 file appended to a copy of the replica while "
                     f"the database is open.")
            lines.append("")
            lines += _table(ps, POLL_ROWS, COLUMNS)
            lines.append("")
        hs = _summ(results, ds, "hydrate")
        if hs:
            lines.append(f"Hydration (`{ds}`, S3 20 ms; database {m['pages'] * 4096 / 1e9:.1f} GB, "
                     f"LTX {m['ltx_bytes'] / 1e6:.0f} MB):")
            lines.append("")
            lines += _table(hs, HYD_ROWS, COLUMNS)
            lines.append("")
        errs = [(k, e) for phase in ("read", "poll", "hydrate")
                for k, s in _summ(results, ds, phase).items() for e in s["errors"]]
        if errs:
            lines.append("Failures:")
            lines.append("")
            for (sys_, tr), e in errs:
                lines.append(f"- {sys_} / {tr}: `{e.strip().splitlines()[0][:300]}`")
            lines.append("")
    return "\n".join(lines)
