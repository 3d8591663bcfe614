"""Write path: commits per second — ltxvfs, the Go VFS and a local SQLite file.

    python bench/commits.py                       # file:// replica, 1 run: ~2 minutes
    python bench/commits.py --store file,s3       # also through the S3 stand-in
    python bench/commits.py --doc docs/benchmarks.md

Each (case, system) is one fresh process (the Go extension is loaded into its own process, set
up by the environment at exec) on a fresh copy of one seeded replica (10,000 rows, an index on
``k``): ltxvfs in write mode (``write_enabled=true``, a private ``buffer_path``), the Go VFS
(``LITESTREAM_WRITE_ENABLED=true``, ``LITESTREAM_BUFFER_PATH``), and a local SQLite file (the
seed restored) in WAL mode and in DELETE mode, with the same ``synchronous``. Committing never
waits for object storage in either VFS (uploads happen every sync interval, in the background),
so no latency proxy is needed: the cases run with a sync interval of 1 h (no upload during the
loop) except ``sustained``, which commits for several seconds with the default 1 s interval, so
the syncs' cost shows. The result is the rate of the timed loop (the final sync at close is not
timed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PYTHON, child_env, create_bucket, export_ltxvfs, s3_url, start_stub

SYSTEMS = ("ltxvfs", "go", "local-wal", "local-delete")
#: name -> (synchronous, locking_mode, journal_mode of the VFSes and local-delete, rows per
#: transaction, sync interval, seconds of commits (0: a count of commits))
CASES: dict[str, tuple[str, str, str, int, str, float]] = {
    "full": ("FULL", "NORMAL", "DELETE", 1, "1h", 0),
    "normal": ("NORMAL", "NORMAL", "DELETE", 1, "1h", 0),
    "off": ("OFF", "NORMAL", "DELETE", 1, "1h", 0),
    "full_exclusive": ("FULL", "EXCLUSIVE", "DELETE", 1, "1h", 0),
    "full_persist": ("FULL", "NORMAL", "PERSIST", 1, "1h", 0),
    "full_txn100": ("FULL", "NORMAL", "DELETE", 100, "1h", 0),
    "full_sustained": ("FULL", "NORMAL", "DELETE", 1, "1s", 3.5),
}
CASE_TEXT = {
    "full": "single-row commits, `synchronous=FULL`",
    "normal": "single-row commits, `synchronous=NORMAL`",
    "off": "single-row commits, `synchronous=OFF`",
    "full_exclusive": "single-row, FULL, `locking_mode=EXCLUSIVE`",
    "full_persist": "single-row, FULL, `journal_mode=PERSIST`",
    "full_txn100": "transactions of 100 rows, FULL (transactions/s)",
    "full_sustained": "single-row, FULL, 3.5 s with `sync_interval=1s` (syncs during the loop)",
}
SEED_ROWS = 10_000
INSERT = "INSERT INTO t(k, name, payload) VALUES(?, ?, ?)"
SCHEMA = ("CREATE TABLE t(id INTEGER PRIMARY KEY, k INTEGER, name TEXT, payload TEXT);"
          "CREATE INDEX t_k ON t(k);")


def _row(rng: random.Random) -> tuple:
    return (rng.randint(1, 1 << 30), f"name-{rng.randint(0, 1 << 30)}", rng.randbytes(100).hex())


# --- the child: one system, one case ------------------------------------------------------------

def child(spec: dict) -> dict:
    import apsw

    sync, locking, journal, per_txn, interval, seconds = CASES[spec["case"]]
    system = spec["system"]
    flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI
    if system.startswith("ltxvfs"):  # ltxvfs, or ltxvfs-before (--before REV)
        import ltxvfs
        ltxvfs.register()
        q = {"vfs": "litestream", "replica_url": spec["replica_url"], "write_enabled": "true",
             "buffer_path": str(Path(spec["tmp"]) / "buf"), "sync_interval": interval}
        con = apsw.Connection("file:bench.db?" + urllib.parse.urlencode(q), flags=flags)
    elif system == "go":
        import litestream_vfs
        boot = apsw.Connection(":memory:")
        boot.enable_load_extension(True)
        boot.load_extension(litestream_vfs.loadable_path(), "sqlite3_litestreamvfs_init")
        con = apsw.Connection("file:bench.db?vfs=litestream", flags=flags)
    else:
        con = apsw.Connection(spec["local_db"], flags=flags)
        journal = "WAL" if system == "local-wal" else journal
    con.set_busy_timeout(30_000)
    con.execute(f"PRAGMA synchronous = {sync}")
    con.execute(f"PRAGMA locking_mode = {locking}")
    mode = con.execute(f"PRAGMA journal_mode = {journal}").fetchall()[0][0]
    start = con.execute("SELECT count(*) FROM t").fetchall()[0][0]
    replica_dir = spec.get("replica_dir")
    l0 = (Path(replica_dir) / "ltx" / "0") if replica_dir else None
    l0_before = len(list(l0.glob("*.ltx"))) if l0 else 0
    rng = random.Random(1)
    batch = [_row(rng) for _ in range(per_txn)]
    cur = con.cursor()
    n = max(int(spec["commits"]) // min(per_txn, 10), 1)  # 100-row transactions: a tenth
    cap = float(spec["cap"])
    done = 0
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    while True:
        if per_txn == 1:
            cur.execute(INSERT, batch[0])
        else:
            cur.execute("BEGIN")
            cur.executemany(INSERT, batch)
            cur.execute("COMMIT")
        done += 1
        elapsed = time.perf_counter() - t0
        if (seconds and elapsed >= seconds) or (not seconds and (done >= n or elapsed >= cap)):
            break
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = ru1.ru_utime - ru0.ru_utime + ru1.ru_stime - ru0.ru_stime  # every thread's
    rows = con.execute("SELECT count(*) FROM t").fetchall()[0][0]
    if rows != start + done * per_txn:
        raise RuntimeError(f"{rows} rows after {done} commits of {per_txn} on {start}")
    out = {"commits": done, "seconds": elapsed, "commits_per_s": done / elapsed,
           "rows_per_s": done * per_txn / elapsed, "journal_mode": mode,
           "cpu_us_per_commit": cpu / done * 1e6}
    if l0:  # uploads made during the loop (file:// replicas)
        out["syncs"] = len(list(l0.glob("*.ltx"))) - l0_before
    con.close()
    return out


def seed(spec: dict) -> None:
    """The seed replica (through ltxvfs write mode) and its local copy (restored)."""
    import apsw

    import ltxvfs
    from ltxvfs.restore import restore
    from ltxvfs.storage import open_replica
    ltxvfs.register()
    q = {"vfs": "litestream", "replica_url": spec["replica_url"], "write_enabled": "true",
         "buffer_path": str(Path(spec["tmp"]) / "buf"), "sync_interval": "1h"}
    con = apsw.Connection("file:bench.db?" + urllib.parse.urlencode(q),
                          flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI)
    con.execute(SCHEMA)
    rng = random.Random(0)
    con.execute("BEGIN")
    con.executemany(INSERT, [_row(rng) for _ in range(SEED_ROWS)])
    con.execute("COMMIT")
    con.execute("PRAGMA litestream_sync").fetchall()
    con.close()
    if spec.get("local_db"):
        with open_replica(spec["replica_url"]) as client:
            restore(client, Path(spec["local_db"]))


# --- the parent ---------------------------------------------------------------------------------

def _run(mode: str, spec: dict, env: dict, timeout: float) -> dict:
    proc = subprocess.run([PYTHON, __file__, f"--{mode}", json.dumps(spec)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {spec.get('system')}/{spec.get('case')} failed "
                           f"({proc.returncode}): {proc.stderr[-1500:]}")
    lines = proc.stdout.strip().splitlines()
    return json.loads(lines[-1]) if mode == "child" else {}


def _stub_control(stub: str, op: str, **params: str) -> None:
    req = urllib.request.Request(f"{stub}/__bench__/{op}?{urllib.parse.urlencode(params)}",
                                 data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        r.read()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child")
    ap.add_argument("--seed")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--commits", type=int, default=2000,
                    help="commits per case (transactions of 100 rows: a tenth)")
    ap.add_argument("--cap", type=float, default=5.0, help="seconds at most per case")
    ap.add_argument("--store", default="file", help="file,s3")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--ltxvfs", default="HEAD", help="commit to measure, or 'worktree'")
    ap.add_argument("--before", help="also measure this commit (column ltxvfs-before)")
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/ltxvfs-bench-commits"))
    ap.add_argument("--doc", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--timeout", type=float, default=180)
    args = ap.parse_args(argv)
    if args.child or args.seed:
        spec = json.loads(args.child or args.seed)
        if args.child:
            print(json.dumps(child(spec)), flush=True)
        else:
            seed(spec)
        os._exit(0)  # background threads of the VFSes: not waited for

    work = args.data_dir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    label, pythonpath = export_ltxvfs(args.ltxvfs, work / "src")
    base_env = child_env({"PYTHONPATH": str(pythonpath) if pythonpath else None})
    systems = [s for s in args.systems.split(",") if s]
    before_env = None
    if args.before:
        before_label, before_path = export_ltxvfs(args.before, work / "src")
        before_env = child_env({"PYTHONPATH": str(before_path) if before_path else None})
        systems.insert(1, "ltxvfs-before")
        label += f" (ltxvfs-before: {before_label})"
    cases = [c for c in args.cases.split(",") if c]
    stores = [s for s in args.store.split(",") if s]
    stub = None
    results: list[dict] = []
    try:
        if "s3" in stores:
            stub = start_stub(work / "stub", work / "stub.log")
            create_bucket(stub.url, "bench")
        seeds = {}
        for store in stores:
            local = work / f"seed-{store}.db"
            url = (work / "seed-file").as_uri() if store == "file" else \
                s3_url(stub.url, "bench", "seed")
            (work / f"tmp-seed-{store}").mkdir()
            _run("seed", {"replica_url": url, "tmp": str(work / f"tmp-seed-{store}"),
                          "local_db": str(local)}, base_env, args.timeout)
            seeds[store] = (url, local)
        n = 0
        for run in range(args.runs):
            for store in stores:
                for case in cases:
                    for system in systems:
                        if store == "s3" and system.startswith("local"):
                            continue
                        n += 1
                        tmp = work / f"tmp-{n}"
                        tmp.mkdir()
                        spec = {"system": system, "case": case, "tmp": str(tmp),
                                "commits": args.commits, "cap": args.cap}
                        if store == "file":
                            shutil.copytree(work / "seed-file", tmp / "replica")
                            spec["replica_url"] = (tmp / "replica").as_uri()
                            spec["replica_dir"] = str(tmp / "replica")
                        else:
                            prefix = f"run-{n}"
                            _stub_control(stub.url, "copy", bucket="bench", src="seed/",
                                          dst=prefix + "/")
                            spec["replica_url"] = s3_url(stub.url, "bench", prefix)
                        shutil.copy(seeds[store][1], tmp / "local.db")
                        spec["local_db"] = str(tmp / "local.db")
                        env = dict(before_env if system == "ltxvfs-before" else base_env)
                        if system == "go":
                            env.update({
                                "LITESTREAM_REPLICA_URL": spec["replica_url"],
                                "LITESTREAM_WRITE_ENABLED": "true",
                                "LITESTREAM_BUFFER_PATH": str(tmp / "buf"),
                                "LITESTREAM_SYNC_INTERVAL": CASES[case][4],
                                "LITESTREAM_LOG_FILE": str(tmp / "go.log")})
                        try:
                            res = _run("child", spec, env, args.timeout)
                        except (RuntimeError, subprocess.TimeoutExpired) as err:
                            res = {"error": str(err)[-500:]}
                        res.update(run=run, store=store, case=case, system=system)
                        results.append(res)
                        print(json.dumps(res), flush=True)
                        shutil.rmtree(tmp, ignore_errors=True)
                        if store == "s3":
                            _stub_control(stub.url, "delete", bucket="bench",
                                          prefix=f"run-{n}/")
    finally:
        if stub is not None:
            stub.stop()
    report = render(results, stores, cases, systems, label, args)
    print(report)
    if args.doc:
        from run import write_doc
        write_doc(args.doc, "commits", report)
    if args.json:
        args.json.write_text(json.dumps({"ltxvfs": label, "results": results}, indent=1))
    return 0


def render(results: list[dict], stores: list[str], cases: list[str], systems: list[str],
           label: str, args: argparse.Namespace) -> str:
    from run import machine_info
    machine, software = machine_info()
    fs = subprocess.run(["df", "-T", str(args.data_dir)], capture_output=True,
                        text=True).stdout.splitlines()[-1].split()[:2]
    out = [f"Machine: {machine}; data dir on {' '.join(fs)}  ",
         f"Software: {software}; ltxvfs {label}  ",
         f"Command: `python bench/commits.py --runs {args.runs} --commits {args.commits} "
         f"--cap {args.cap:g} "
         f"--store {','.join(stores)}{' --before ' + args.before if args.before else ''}` "
         f"(median of {args.runs} run(s) per cell; commits/s of the "
         "timed loop)", ""]
    head = ["case", *systems, "ltxvfs / go, per run"]
    for store in stores:
        out += [f"**{store} replica**", "", "| " + " | ".join(head) + " |",
              "|" + "---|" * len(head)]
        for case in cases:
            cells, med = [CASE_TEXT[case]], {}
            for system in systems:
                got = [r["commits_per_s"] for r in results if r["store"] == store and
                       r["case"] == case and r["system"] == system and "commits_per_s" in r]
                errs = [r for r in results if r["store"] == store and r["case"] == case and
                        r["system"] == system and "error" in r]
                syncs = [r["syncs"] for r in results if r["store"] == store and
                         r["case"] == case and r["system"] == system and "syncs" in r]
                if got:
                    med[system] = statistics.median(got)
                    note = f" ({max(syncs)} syncs)" if case == "full_sustained" and syncs and \
                        not system.startswith("local") else ""
                    cells.append(f"{med[system]:,.0f}{note}")
                else:
                    cells.append("error" if errs else "—")
            # Paired: each run's ltxvfs / go (the two ran one after the other), then the median;
            # steadier than a ratio of medians when the machine's load moves.
            pairs = []
            for run in sorted({r["run"] for r in results}):
                one = {r["system"]: r.get("commits_per_s") for r in results if r["run"] == run
                       and r["store"] == store and r["case"] == case}
                if one.get("ltxvfs") and one.get("go"):
                    pairs.append(one["ltxvfs"] / one["go"])
            cells.append(", ".join(f"{p:.2f}" for p in pairs) +
                         f" (median {statistics.median(pairs):.2f}x)" if pairs else "—")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        cpu_rows = []
        for case in cases:
            cells = [CASE_TEXT[case]]
            for system in systems:
                got = [r["cpu_us_per_commit"] for r in results if r["store"] == store and
                       r["case"] == case and r["system"] == system and "cpu_us_per_commit" in r]
                cells.append(f"{statistics.median(got):,.0f}" if got else "—")
            cpu_rows.append("| " + " | ".join(cells) + " |")
        out += [f"CPU time per commit ({store} replica; µs, user + system of every thread of the "
                "process, median) — less sensitive to the machine's load than the rates:", "",
                "| " + " | ".join(["case", *systems]) + " |", "|" + "---|" * (len(systems) + 1),
                *cpu_rows, ""]
    errors = [r for r in results if "error" in r]
    for r in errors[:10]:
        out.append(f"- error: {r['store']} / {r['case']} / {r['system']}: `{r['error'][-300:]}`")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
