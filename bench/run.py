"""Benchmark ltxvfs against the Go Litestream VFS and a plain local SQLite file.

    python bench/run.py --quick          # ~20 MB database only, a few minutes
    python bench/run.py                  # ~20 MB and ~200 MB databases (< 15 min on 2 cores)

What it does (see docs/benchmarks.md for the results and bench/README.md for the design):

1. starts the S3 stand-in (bench/s3stub.py) and, in front of it, the latency-injecting,
   request-counting proxy (bench/proxy.py, default 20 ms per request), both on 127.0.0.1;
2. builds the datasets with the real ``litestream replicate`` (bench/dataset.py; cached in the
   data dir and reused while valid) and restores a local copy with ``litestream restore``;
3. for every run, dataset, workload and system, starts a fresh child process
   (bench/child.py) so that "cold" is really cold, and collects its metrics, the proxy's
   request counts and bytes, and its peak RSS (``ru_maxrss`` from ``wait4``);
4. writes medians, ratios against Go and local, and the targets to docs/benchmarks.md (between
   generated markers, one section per mode) and the raw results to bench/results/<mode>.json;
5. with ``--profile``, profiles ltxvfs on the workloads with pyinstrument afterwards.

Systems: ``ltxvfs`` (the commit ``--ltxvfs REV`` of this repo, default HEAD, exported with git
archive so concurrent edits of src/ do not change the code under test), ``go`` (PyPI
``litestream-vfs`` loaded into apsw, replica from LITESTREAM_REPLICA_URL at exec), ``local``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dataset
from common import (
    BENCH_DIR,
    PYTHON,
    REPO,
    child_env,
    export_ltxvfs,
    s3_url,
    start_proxy,
    start_stub,
)

DATASETS = {"small": 20, "large": 200, "huge": 1100}  # MB; huge: >= 1 GiB (issue 13, item 4)
SYSTEMS = ("ltxvfs", "go", "local")


@dataclass(frozen=True)
class Metric:
    key: str  # key in the child's result
    label: str
    unit: str  # s, ms, us, n, /min, B
    lower_is_better: bool = True


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    title: str
    metrics: tuple[Metric, ...]
    systems: tuple[str, ...] = SYSTEMS
    datasets: str = "all"  # "all" or "first" (rate measurements that do not depend on size)
    profile: bool = True
    write: bool = False  # a fresh copy of the replica per (run, system); Go in write mode
    go_env: tuple[tuple[str, str], ...] = ()  # extra environment for the Go child


#: What each workload reports. A new workload = a function in child.WORKLOADS + one entry here.
WORKLOAD_TABLE: tuple[WorkloadSpec, ...] = (
    WorkloadSpec("cold_lookup", "cold open → first point lookup", (
        Metric("first_row_s", "time to first row", "s"),
        Metric("open_s", "of which open", "s"),
        Metric("cold_start_s", "incl. process setup (import+register / load extension)", "s"),
        Metric("requests", "requests", "n"),
        Metric("rss_open_kb", "RSS growth from open + first lookup", "KiB"),
    )),
    WorkloadSpec("scan_count", "cold `SELECT count(*) FROM t` (walks index t_k)", (
        Metric("time_s", "time", "s"),
        Metric("requests", "requests", "n"),
    )),
    WorkloadSpec("scan_sum", "cold `SELECT sum(length(payload)) FROM t` (every table page)", (
        Metric("time_s", "time", "s"),
        Metric("requests", "requests", "n"),
    )),
    WorkloadSpec("warm_lookups", "1,000 warm random point lookups (hot set of 200 keys; "
                 "median of 5 passes)", (
        Metric("us_per_lookup", "per lookup", "us"),
        Metric("requests", "requests (timed part)", "n"),
    )),
    WorkloadSpec("range_scans", "cold range scans (10 × 500 consecutive rows)", (
        Metric("ms_per_scan", "per scan", "ms"),
        Metric("requests_per_scan", "requests per scan", "n"),
    )),
    WorkloadSpec("idle_follower", "idle follower (open connection, no writes)", (
        Metric("list_per_min", "LIST requests per minute", "/min"),
        Metric("requests_per_min", "all requests per minute", "/min"),
    ), systems=("ltxvfs", "go"), datasets="first", profile=False),
    WorkloadSpec("noop", "setup only (import + register / load extension)", (
        Metric("setup_s", "setup time", "s"),
    ), profile=False),
    WorkloadSpec("single_row_commits", "1,000 single-row commits (autocommit; sync interval "
                 "1 s), then a final sync", (
        Metric("commits_per_s", "commits/s (commit loop)", "n", lower_is_better=False),
        Metric("total_s", "total incl. final sync (ltxvfs: PRAGMA litestream_sync; Go: close)",
               "s"),
        Metric("sync_s", "of which final sync", "s"),
        Metric("requests", "requests", "n"),
        Metric("uploaded_txids", "TXIDs uploaded", "n"),
    ), systems=("ltxvfs", "go"), datasets="first", write=True),
    WorkloadSpec("bulk_transaction", "one 100,000-row transaction, then until synced", (
        Metric("time_s", "commit + sync", "s"),
        Metric("commit_s", "of which COMMIT returned", "s"),
        Metric("requests", "requests", "n"),
        Metric("bytes_up", "bytes uploaded", "B"),
    ), systems=("ltxvfs", "go"), datasets="first", write=True),
    WorkloadSpec("commit_visible", "commit one row → its LTX file listed in the bucket "
                 "(default sync interval 1 s; median of 5 commits at random phases)", (
        Metric("visible_s", "commit → visible", "s"),
        Metric("visible_max_s", "worst of 5", "s"),
    ), systems=("ltxvfs", "go"), datasets="first", write=True, profile=False),
    WorkloadSpec("commit_visible_100ms", "the same with sync_interval=100ms "
                 "(LITESTREAM_SYNC_INTERVAL=100ms for Go)", (
        Metric("visible_s", "commit → visible", "s"),
        Metric("visible_max_s", "worst of 5", "s"),
    ), systems=("ltxvfs", "go"), datasets="first", write=True, profile=False,
        go_env=(("LITESTREAM_SYNC_INTERVAL", "100ms"),)),
    WorkloadSpec("hydration", "hydration to completion (`litestream_hydration_progress` = 100); "
                 "the *local* column is a raw download of the same bytes (snapshot + L1, "
                 "8 threads of ranged GETs through the proxy)", (
        Metric("time_s", "time (from open)", "s"),
        Metric("open_s", "of which open", "s"),
        Metric("requests", "requests", "n"),
        Metric("bytes", "bytes downloaded", "B"),
    ), go_env=(("LITESTREAM_HYDRATION_ENABLED", "true"),)),
)
WORKLOADS = {w.name: w for w in WORKLOAD_TABLE}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


PATCH: list[Path | None] = [None]  # --ltxvfs-patch, for child_env_for


def child_env_for(system: str, url: str, pythonpath: Path | None, extra: dict | None = None
                  ) -> dict[str, str]:
    env: dict[str, str | None] = {}
    if system == "go":
        env["LITESTREAM_REPLICA_URL"] = url  # the Go VFS reads it once, at load
    if system == "ltxvfs" and pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    if system == "ltxvfs" and PATCH[0] is not None:
        env["BENCH_LTXVFS_PATCH"] = str(PATCH[0])
    env.update(extra or {})
    return child_env(env)


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_child(system: str, workload: str, spec: dict, work: Path, env: dict[str, str],
              timeout: float, profile_to: Path | None = None,
              rss_cap_kb: int | None = None) -> dict:
    """One fresh child process; returns its result with ``peak_rss_kb`` (wait4) and
    ``wall_s``, or ``{"error": ...}``. ``rss_cap_kb``: the child is killed when its resident
    set exceeds it (checked every 20 ms; the error says so)."""
    spec_path = work / "spec.json"
    out = work / "out.json"
    spec_path.write_text(json.dumps(spec))
    out.unlink(missing_ok=True)
    env = dict(env)
    if profile_to is not None:
        env["BENCH_PYINSTRUMENT"] = str(profile_to)
    errf = open(work / "child.stderr", "w+b")
    t0 = time.monotonic()
    proc = subprocess.Popen([PYTHON, str(BENCH_DIR / "child.py"), "--system", system,
                             "--workload", workload, "--spec", str(spec_path), "--out", str(out)],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=errf)
    status, rusage = None, None
    deadline = t0 + timeout
    killed = ""
    try:
        for _ in range(int(timeout / 0.02) + 100):  # bounded wait
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                status, rusage = st, ru
                break
            if time.monotonic() > deadline:
                killed = f"killed after the {timeout:.0f}s timeout"
                break
            if rss_cap_kb and (rss := _rss_kb(proc.pid)) > rss_cap_kb:
                killed = (f"killed at RSS {rss / 1024:.0f} MiB (cap {rss_cap_kb / 1024:.0f} MiB) "
                          f"after {time.monotonic() - t0:.1f}s")
                break
            time.sleep(0.02)
    finally:
        if status is None:  # timed out, or we are being stopped: end the child we started
            os.kill(proc.pid, signal.SIGKILL)
            _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    wall = time.monotonic() - t0
    errf.seek(0)
    err = errf.read().decode(errors="replace")
    errf.close()
    if proc.returncode != 0 or not out.exists():
        return {"error": f"{killed + '; ' if killed else ''}rc={proc.returncode} after "
                         f"{wall:.1f}s: {err[-1500:]}", "wall_s": wall,
                "peak_rss_kb": rusage.ru_maxrss if rusage is not None else None}
    res = json.loads(out.read_text())
    res["peak_rss_kb"] = rusage.ru_maxrss
    res["wall_s"] = wall
    return res


# --------------------------------------------------------------------------------------------
# Statistics and the report
# --------------------------------------------------------------------------------------------

def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "–"
    if unit == "s":
        return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"
    if unit == "ms":
        return f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"
    if unit == "us":
        return f"{v:.1f} µs" if v < 100 else f"{v:.0f} µs"
    if unit == "/min":
        return f"{v:.0f}"
    if unit == "B":
        return human_bytes(v)
    if unit == "KiB":
        return f"{v / 1024:.1f} MiB"
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 or v >= 100 else f"{v:.1f}"


def human_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "–"
    if b == 0:
        return "–" if a == 0 else "∞"
    r = a / b
    if r < 0.1:
        return f"{r:.3f}×"
    return f"{r:.2f}×" if r < 100 else f"{r:.0f}×"


def summarize(results: list[dict]) -> dict:
    """{(dataset, workload, system): {metric: median, ...}, ...} plus run counts, flags."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["workload"], r["system"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        ok = [r["result"] for r in rs if "error" not in r["result"]]
        s: dict = {"runs": len(ok), "errors": [r["result"]["error"] for r in rs
                                             if "error" in r["result"]]
                   + [r["failure"] for r in ok if r.get("failure")]}
        numeric = {k for r in ok for k, v in r.items() if isinstance(v, (int, float))
                   and not isinstance(v, bool)}
        for k in numeric:
            s[k] = median([r.get(k) for r in ok])
        s["extrapolated"] = any(r.get("completed") is False and not r.get("incomplete")
                                for r in ok)
        s["incomplete"] = any(r.get("incomplete") for r in ok)
        kinds: dict[str, list[float]] = {}
        for r in ok:
            for kind in r.get("req_counts", {}):
                kinds.setdefault(kind, [])
        for kind in kinds:
            s[f"kind_{kind}"] = median([r.get("req_counts", {}).get(kind, 0) for r in ok])
        out[key] = s
    return out


TARGETS = [
    # (label, dataset selector, workload, metric, against, factor, what)
    ("cold first lookup ≤ 0.35 × Go", "cold_lookup", "first_row_s", "go", 0.35),
    ("cold first lookup: requests ≤ Go", "cold_lookup", "requests", "go", 1.0),
    ("cold count(*) ≤ 0.05 × Go", "scan_count", "time_s", "go", 0.05),
    ("cold full scan ≤ 0.05 × Go", "scan_sum", "time_s", "go", 0.05),
    ("warm lookups ≤ 0.5 × Go", "warm_lookups", "us_per_lookup", "go", 0.5),
    ("warm lookups ≤ 3 × local", "warm_lookups", "us_per_lookup", "local", 3.0),
    ("idle follower LIST/min ≤ 0.5 × Go", "idle_follower", "list_per_min", "go", 0.5),
    ("hydration time ≤ 0.5 × Go", "hydration", "time_s", "go", 0.5),
    ("hydration ≥ 0.8 × raw parallel download speed (time ≤ 1.25 × raw)", "hydration", "time_s",
     "local", 1.25),
]


def target_rows(summary: dict, datasets: list[str]) -> list[str]:
    rows = []
    for label, wl, metric, against, factor in TARGETS:
        for ds in datasets:
            a = summary.get((ds, wl, "ltxvfs"), {}).get(metric)
            b = summary.get((ds, wl, against), {}).get(metric)
            if a is None or b is None:
                continue
            ok = a <= factor * b
            unit = next(m.unit for m in WORKLOADS[wl].metrics if m.key == metric)
            approx = "~" if summary.get((ds, wl, against), {}).get("extrapolated") else ""
            rows.append(f"| {label} | {ds} | {fmt(a, unit)} | {approx}{fmt(b, unit)} | "
                        f"{approx}{ratio(a, b)} | {'met' if ok else '**missed**'} |")
    return rows


def render(meta: dict, summary: dict, datasets: list[str], manifests: dict) -> str:
    L: list[str] = []  # noqa: N806
    L.append(f"Command: `{meta['command']}`  ")
    L.append(f"Date: {meta['date']}  ")
    L.append(f"Machine: {meta['machine']}  ")
    L.append(f"Software: {meta['software']}  ")
    L.append(f"Setup: latency proxy {meta['latency_ms']:g} ms per request; {meta['runs']} runs, "
             f"medians shown; each (run, dataset, workload, system) in a fresh process; "
             f"cache 10 MiB in both VFSes (their default); scan budget "
             f"{meta['scan_budget_s']:g} s for the Go VFS (see Method); wall time {meta['wall_s']:.0f} s.")
    L.append("")
    for ds in datasets:
        m = manifests[ds]
        f = m["facts"]
        plan = ", ".join(f"L{x['level']} {x['min']:x}-{x['max']:x} ({human_bytes(x['size'])})"
                         for x in m.get("plan", []))
        L.append(f"#### Dataset `{ds}`: {f['page_count']} pages × {f['page_size']} B = "
                 f"{human_bytes(f['page_count'] * f['page_size'])}, {f['rows']} rows")
        L.append("")
        L.append(f"Table t: {f.get('pages_t', '?')} pages, index t_k: {f.get('pages_t_k', '?')} "
                 f"pages; replica: {len(m['ltx_files'])} LTX files, restore plan: {plan}.")
        L.append("")
        L.append("| workload | metric | ltxvfs | Go VFS | local | ltxvfs/Go | ltxvfs/local |")
        L.append("|---|---|---|---|---|---|---|")
        for w in WORKLOAD_TABLE:
            if w.datasets == "first" and ds != datasets[0]:
                continue
            if not any((ds, w.name, s) in summary for s in w.systems):
                continue
            for i, met in enumerate(w.metrics):
                vals = {}
                cells = []
                for s in SYSTEMS:
                    g = summary.get((ds, w.name, s))
                    v = g.get(met.key) if g else None
                    vals[s] = v
                    approx = ""
                    if g and met.key in ("time_s", "requests"):
                        approx = "~" if g.get("extrapolated") else (
                            ">" if g.get("incomplete") else "")
                    cells.append(approx + fmt(v, met.unit) if v is not None else "–")
                go_x = "~" if summary.get((ds, w.name, "go"), {}).get("extrapolated") else ""
                rg = ratio(vals["ltxvfs"], vals["go"])
                rl = ratio(vals["ltxvfs"], vals["local"])
                L.append(f"| {w.title if i == 0 else ''} | {met.label} | {' | '.join(cells)} | "
                         f"{go_x + rg if rg != '–' else rg} | {rl} |")
        L.append("")
        L.append("Requests by kind, bytes downloaded, peak RSS (medians):")
        L.append("")
        L.append("| workload | system | requests by kind | bytes | peak RSS | RSS after setup |")
        L.append("|---|---|---|---|---|---|")
        for w in WORKLOAD_TABLE:
            if w.datasets == "first" and ds != datasets[0]:
                continue
            for s in w.systems:
                g = summary.get((ds, w.name, s))
                if not g:
                    continue
                kinds = ", ".join(f"{k[5:]} {fmt(v, 'n')}" for k, v in sorted(g.items())
                                  if k.startswith("kind_") and v) or "–"
                x = "~" if g.get("extrapolated") else ""
                if g.get("extrapolated"):
                    kinds += f" (measured share {g.get('fraction_done', 0) * 100:.0f}%)"
                L.append(f"| {w.name} | {s} | {kinds} | {x}{human_bytes(g.get('bytes'))} | "
                         f"{(g.get('peak_rss_kb') or 0) / 1024:.0f} MiB | "
                         f"{(g.get('rss_setup_kb') or 0) / 1024:.0f} MiB |")
        L.append("")
    L.append("#### Targets (ltxvfs against the reference, same run)")
    L.append("")
    L.append("| target | dataset | ltxvfs | reference | ratio | |")
    L.append("|---|---|---|---|---|---|")
    L.extend(target_rows(summary, datasets))
    L.append("")
    errors = [(k, e) for k, g in summary.items() for e in g.get("errors", [])]
    if errors:
        L.append("Errors:")
        L.append("")
        for (ds, wl, s), e in errors[:20]:
            first = e.strip().splitlines()[-1] if e.strip() else e
            L.append(f"- {ds} / {wl} / {s}: `{first[:300]}`")
        L.append("")
    return "\n".join(L)


def write_doc(path: Path, mode: str, body: str) -> None:
    begin, end = f"<!-- BEGIN GENERATED {mode} -->", f"<!-- END GENERATED {mode} -->"
    block = f"{begin}\n{body}\n{end}"
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nGenerated by `python bench/run.py` (see bench/README.md).\n\n"
        "## Quick mode\n\n<!-- BEGIN GENERATED quick -->\n<!-- END GENERATED quick -->\n\n"
        "## Full mode\n\n<!-- BEGIN GENERATED full -->\n<!-- END GENERATED full -->\n")
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text,
                      flags=re.S)
    else:
        text += f"\n\n## {mode}\n\n{block}\n"
    path.write_text(text)


def machine_info() -> tuple[str, str]:
    import apsw
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB RAM"
    except OSError:
        pass
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    machine = f"{os.cpu_count()} cores (nproc), {cpu}, {mem}, {platform.platform()}"
    ls = subprocess.run([str(Path(PYTHON).parent / "litestream"), "version"],
                        capture_output=True, text=True).stdout.strip()
    try:
        from importlib.metadata import version
        vfs_v = version("litestream-vfs")
        boto_v = version("boto3")
    except Exception:
        vfs_v = boto_v = "?"
    software = (f"Python {platform.python_version()}, apsw {apsw.apswversion()}, SQLite "
                f"{apsw.sqlite_lib_version()}, boto3 {boto_v}, litestream {ls}, "
                f"litestream-vfs {vfs_v}")
    return machine, software


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="ltxvfs vs the Go VFS vs local SQLite",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~20 MB dataset only, shorter idle window")
    ap.add_argument("--runs", type=int, default=None,
                    help="runs per measurement (medians reported); default 3 (--suite large: the "
                         "read children; poll and hydration run once)")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="added to every S3 request")
    ap.add_argument("--datasets", default=None,
                    help="comma list of small (~20 MB), large (~200 MB); default: small "
                         "with --quick, else both")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--suite", choices=("main", "workloads", "fleet", "large"), default="main",
                    help="main: the workloads below; workloads: the access-pattern suite of "
                         "bench/workloads.py (its own report section, --datasets default small); "
                         "fleet: many processes on one replica (bench/fleet.py -h); "
                         "large: generated 1-40 GB replicas (bench/large.py, --datasets "
                         "default 1g,4g)")
    ap.add_argument("--workloads", default=None,
                    help="comma list (default: all of the chosen suite)")
    ap.add_argument("--ltxvfs", default="HEAD",
                    help="git revision of ltxvfs to measure, or 'worktree' for the live src/")
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/ltxvfs-bench"))
    ap.add_argument("--rebuild", action="store_true", help="rebuild the datasets")
    ap.add_argument("--scan-budget", type=float, default=None,
                    help="seconds a cold full scan may take before it is stopped and "
                         "extrapolated (Go VFS only; it fetches one page per request)")
    ap.add_argument("--scan-cap", type=float, default=120.0,
                    help="safety cap for the other systems' scans (a lower bound if hit)")
    ap.add_argument("--idle-seconds", type=float, default=None,
                    help="idle follower window (default 10 quick, 20 full)")
    ap.add_argument("--lookups", type=int, default=1000)
    ap.add_argument("--hot-keys", type=int, default=200)
    ap.add_argument("--range-scans", type=int, default=10)
    ap.add_argument("--range-rows", type=int, default=500)
    ap.add_argument("--passes", type=int, default=5, help="timed passes of the warm lookups")
    ap.add_argument("--zipf-lookups", type=int, default=4000, help="suite: Zipf lookups")
    ap.add_argument("--suite-timeout", type=float, default=900.0,
                    help="suite: seconds one child may take before it is killed")
    ap.add_argument("--large-timeout", type=float, default=600.0,
                    help="large: seconds one child may take before it is killed")
    ap.add_argument("--rss-cap-mb", type=float, default=12_000.0,
                    help="large: a child whose resident set exceeds this is killed")
    ap.add_argument("--large-lookups", type=int, default=20,
                    help="large: random point lookups after the first one")
    ap.add_argument("--transports", default="s3,file",
                    help="large: s3 (stand-in behind the latency proxy) and/or file (file://)")
    ap.add_argument("--poll-datasets", default="4g",
                    help="large: datasets for the poll measurement ('' = none)")
    ap.add_argument("--hydrate-datasets", default="4g",
                    help="large: datasets for the hydration measurement ('' = none)")
    ap.add_argument("--local-max-pages", type=int, default=1_000_000,
                    help="large: restore a local copy (the 'local' column) up to this size")
    ap.add_argument("--ltxvfs-patch", type=Path, default=None,
                    help="EXPERIMENT: a Python file run in each ltxvfs child after register() "
                         "(e.g. bench/experiments/readahead_streams.py); results are labelled")
    ap.add_argument("--profile", action="store_true",
                    help="afterwards, profile ltxvfs (pyinstrument) on each workload, one run")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md",
                    help="Markdown file to update ('-' to skip)")
    ap.add_argument("--json", type=Path, default=None,
                    help="raw results (default bench/results/<mode>.json)")
    return ap.parse_args(argv)


def _terminate(signum, frame):  # SIGTERM: unwind so that children and servers are stopped
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    given = sys.argv[1:] if argv is None else argv
    if "fleet" in given and "--suite" in given:  # its own options: bench/fleet.py -h
        import fleet
        return fleet.main(given)
    args = parse_args(argv)
    if args.runs is None:
        args.runs = 3
    signal.signal(signal.SIGTERM, _terminate)
    if args.suite == "workloads":
        import suite
        return suite.main(args, argv, sys.modules[__name__])
    if args.suite == "large":
        import large
        return large.main(args, argv, sys.modules[__name__])
    args.workloads = args.workloads or ",".join(w.name for w in WORKLOAD_TABLE)
    mode = "quick" if args.quick else "full"
    datasets = (args.datasets.split(",") if args.datasets
                else (["small"] if args.quick else ["small", "large"]))
    systems = args.systems.split(",")
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            raise SystemExit(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
    scan_budget = args.scan_budget if args.scan_budget is not None else 10.0
    idle_s = args.idle_seconds if args.idle_seconds is not None else (10 if args.quick else 20)
    params = {"scan_budget_s": scan_budget, "scan_cap_s": args.scan_cap, "idle_s": idle_s,
              "lookups": args.lookups, "hot_keys": args.hot_keys, "passes": args.passes,
              "range_scans": args.range_scans, "range_rows": args.range_rows}
    t_start = time.monotonic()
    data = args.data_dir
    (data / "logs").mkdir(parents=True, exist_ok=True)
    work = data / "work"
    work.mkdir(exist_ok=True)
    label, pythonpath = export_ltxvfs(args.ltxvfs, data / "src")
    if args.ltxvfs_patch is not None:
        PATCH[0] = args.ltxvfs_patch.resolve()
        label += f" + EXPERIMENTAL PATCH {args.ltxvfs_patch}"
        mode += "-patched"
    log(f"ltxvfs under test: {label}")

    stub = start_stub(data / "s3", data / "logs" / "s3stub.log")
    proxy = None
    results: list[dict] = []
    manifests: dict[str, dict] = {}
    try:
        for ds in datasets:
            manifests[ds] = dataset.build(ds, DATASETS[ds], data, stub.url, rebuild=args.rebuild,
                                          log=log)
        proxy = start_proxy(stub.url, args.latency_ms, data / "logs" / "proxy.log")
        log(f"stand-in {stub.url}, proxy {proxy.url} ({args.latency_ms:g} ms)")
        for ds in datasets:
            m = manifests[ds]
            m["plan"] = restore_plan(m["ltx_files"])
        for run in range(args.runs):
            for ds in datasets:
                m = manifests[ds]
                url = s3_url(proxy.url, m["bucket"], m["prefix"])
                for wname in workloads:
                    w = WORKLOADS[wname]
                    if w.datasets == "first" and ds != datasets[0]:
                        continue
                    for system in systems:
                        if system not in w.systems:
                            continue
                        spec = {"dataset": m, "replica_url": url, "endpoint": proxy.url,
                                "params": params, "seed": 1000 * run + 7}
                        timeout = args.scan_cap + idle_s + 180
                        res = run_prepared(w, system, spec, run, stub, proxy, work,
                                           pythonpath, timeout)
                        results.append({"run": run, "dataset": ds, "workload": wname,
                                        "system": system, "result": res})
                        log(f"run {run + 1}/{args.runs} {ds:5} {wname:13} {system:6} "
                            + brief(w, res))
        profiles = {}
        if args.profile:
            profiles = run_profiles(args, datasets, workloads, manifests, stub, proxy, params,
                                    pythonpath, data, scan_budget, idle_s)
    finally:
        if proxy is not None:
            proxy.stop()
        stub.stop()

    summary = summarize(results)
    machine, software = machine_info()
    meta = {"command": "python bench/run.py " + " ".join(argv if argv is not None
                                                        else sys.argv[1:]),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine, "software": software + f"; ltxvfs {label}",
            "latency_ms": args.latency_ms, "runs": args.runs, "scan_budget_s": scan_budget,
            "idle_s": idle_s, "params": params,
            "wall_s": time.monotonic() - t_start}
    body = render(meta, summary, datasets, manifests)
    print(body)
    out_json = args.json or (BENCH_DIR / "results" / f"{mode}.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"meta": meta, "results": results,
                                    "manifests": manifests}, indent=1, default=str))
    if str(args.doc) != "-":
        write_doc(args.doc, mode, body)
        log(f"wrote {args.doc} and {out_json}")
    if args.profile:
        for name, p in profiles.items():
            log(f"profile {name}: {p}")
    log(f"total {time.monotonic() - t_start:.0f}s")
    return 0


def _stub_control(stub_url: str, op: str, **q: str) -> dict:
    req = urllib.request.Request(f"{stub_url}/__bench__/{op}?{urllib.parse.urlencode(q)}",
                                 data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def run_prepared(w: WorkloadSpec, system: str, spec: dict, run: int, stub, proxy, work: Path,
                 pythonpath: Path | None, timeout: float, profile_to: Path | None = None
                 ) -> dict:
    """One child with what its workload needs: a private temp dir (write buffer, hydration
    file) and, for write workloads, a fresh copy of the dataset's prefix (hard links in the
    stand-in), deleted afterwards; the Go child gets its write/hydration environment."""
    m = spec["dataset"]
    tmp = work / f"tmp-{w.name}-{system}-{run}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    spec = dict(spec, tmpdir=str(tmp), stub=stub.url, replica_prefix=m["prefix"])
    extra = dict(w.go_env) if system == "go" else {}
    copy = None
    if w.write:
        copy = f"{m['prefix']}-w{run}-{w.name}-{system}-{os.getpid()}"
        _stub_control(stub.url, "delete", bucket=m["bucket"], prefix=copy + "/")
        _stub_control(stub.url, "copy", bucket=m["bucket"], src=m["prefix"] + "/",
                      dst=copy + "/")
        spec["replica_prefix"] = copy
        spec["replica_url"] = s3_url(proxy.url, m["bucket"], copy)
        if system == "go":
            extra.setdefault("LITESTREAM_WRITE_ENABLED", "true")
            extra.setdefault("LITESTREAM_BUFFER_PATH", str(tmp / "buf"))
    if system == "go" and w.name == "hydration":
        extra["LITESTREAM_HYDRATION_PATH"] = str(tmp / "hydrated.db")
    env = child_env_for(system, spec["replica_url"], pythonpath, extra)
    try:
        return run_child(system, w.name, spec, work, env, timeout, profile_to=profile_to)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if copy is not None:
            try:
                _stub_control(stub.url, "delete", bucket=m["bucket"], prefix=copy + "/")
            except OSError:
                pass


def brief(w: WorkloadSpec, res: dict) -> str:
    if "error" in res:
        return "ERROR " + res["error"].strip().splitlines()[-1][:200]
    parts = [f"{m.key}={fmt(res.get(m.key), m.unit)}" for m in w.metrics if m.key in res]
    if res.get("completed") is False:
        parts.append(f"(extrapolated from {res.get('fraction_done', 0) * 100:.0f}%)")
    parts.append(f"rss={res.get('peak_rss_kb', 0) / 1024:.0f}MiB")
    return " ".join(parts)


def restore_plan(files: list[dict]) -> list[dict]:
    """Litestream's latest restore plan over a manifest's file list (for the report)."""
    snaps = [f for f in files if f["level"] == 9]
    plan = [snaps[-1]] if snaps else []
    cur = plan[-1]["max"] if plan else 0
    for _ in range(len(files)):
        cands = [f for f in files if f["level"] < 9 and f["min"] <= cur + 1 < f["max"] + 1]
        if not cands:
            break
        best = max(cands, key=lambda f: (f["max"], -f["min"], f["level"]))
        plan.append(best)
        cur = best["max"]
    return plan


def run_profiles(args, datasets, workloads, manifests, stub, proxy, params, pythonpath, data,
                 scan_budget, idle_s) -> dict:
    """One pyinstrument-profiled ltxvfs run per workload on the largest dataset."""
    out = {}
    ds = datasets[-1]
    m = manifests[ds]
    url = s3_url(proxy.url, m["bucket"], m["prefix"])
    pdir = data / "profiles"
    pdir.mkdir(exist_ok=True)
    for wname in workloads:
        w = WORKLOADS[wname]
        if not w.profile or "ltxvfs" not in w.systems:
            continue
        p = dict(params)
        if wname == "warm_lookups":  # enough samples for a µs-scale loop
            p["lookups"] = max(p["lookups"], 20_000)
        spec = {"dataset": m, "replica_url": url, "endpoint": proxy.url, "params": p,
                "seed": 7}
        path = pdir / f"{ds}-{wname}.txt"
        res = run_prepared(w, "ltxvfs", spec, 0, stub, proxy, data / "work", pythonpath,
                           args.scan_cap + idle_s + 180, profile_to=path)
        out[wname] = f"{path} ({brief(w, res)})"
    return out


if __name__ == "__main__":
    sys.exit(main())
