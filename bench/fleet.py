"""Many processes on one replica (issue 18): ``python bench/run.py --suite fleet`` (or this file).

For each configuration — 1 or 8 reader processes, with and without a shared ``cache_dir``,
with and without hydration (all as URI parameters, so any other setting can be added with
``--params``) — on a fresh copy of the dataset's replica, while a writer process (ltxvfs write
mode, straight to the stand-in: not counted) commits one small transaction a second:

1. *open*: the readers open the replica;
2. *busy*: each does the same ``--lookups`` random point lookups (same seed);
3. *idle*: no reads for ``--idle-seconds``, the writer still committing;
4. *late read*: one read each; how old was the data it saw (since the first commit it missed)?
   ``max_lag`` (default 3 × ``poll_interval``) bounds it, plus the writer's own upload time.

Requests are counted by kind by the proxy (all readers together: the host), bytes too; disk is
what ``cache_dir`` and the hydration files hold at the end. Results go between
``<!-- BEGIN/END GENERATED fleet -->`` in docs/benchmarks.md and to bench/results/fleet.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH_DIR,
    PYTHON,
    REPO,
    child_env,
    export_ltxvfs,
    proxy_stats,
    s3_url,
    start_proxy,
    start_stub,
    stats_delta,
)

WRITER = r"""
import sys, time, apsw, ltxvfs
ltxvfs.register()
con = apsw.Connection(sys.argv[1], flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_URI)
con.set_busy_timeout(5000)
every = float(sys.argv[2])
print("ready", flush=True)
n = 0
while True:
    n += 1
    con.execute("UPDATE t SET k = k + 1 WHERE id = ?", (1 + n % 1000,))
    txid = con.execute("PRAGMA litestream_sync").fetchall()[0][0]
    print("txid", txid, flush=True)
    time.sleep(every)
"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def vfs_uri(url: str, params: dict[str, str]) -> str:
    q = {"vfs": "litestream", "replica_url": url, **params}
    return "file:bench.db?" + urllib.parse.urlencode(q, quote_via=urllib.parse.quote)


class Child:
    """A process speaking one JSON line per command line (bounded waits)."""

    def __init__(self, args: list[str], env: dict[str, str], err: Path) -> None:
        self.errf = open(err, "ab")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.errf, env=env, text=True, bufsize=1)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def reply_line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"child {self.proc.pid} gave no answer in {timeout:g}s")
        return self.proc.stdout.readline().strip()

    def reply(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError(f"child {self.proc.pid} gave no answer in {timeout:g}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"child {self.proc.pid} exited (rc={self.proc.poll()})")
        return json.loads(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # ours, by pid
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.errf.close()


def du(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def run_config(name: str, procs: int, params: dict[str, str], m: dict, stub, proxy,
               work: Path, env: dict[str, str], args) -> dict:
    copy = f"{m['prefix']}-fleet-{name}-{os.getpid()}"
    ctl = f"{stub.url}/__bench__/%s?%s"
    for op, q in (("delete", {"prefix": copy + "/"}),
                  ("copy", {"src": m["prefix"] + "/", "dst": copy + "/"})):
        req = urllib.request.Request(ctl % (op, urllib.parse.urlencode(
            {"bucket": m["bucket"], **q})), data=b"", method="POST")
        urllib.request.urlopen(req, timeout=120).read()
    tmp = work / f"fleet-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "hyd").mkdir(parents=True)
    params = {k: v.replace("{tmp}", str(tmp)) for k, v in params.items()}
    writer_uri = vfs_uri(s3_url(stub.url, m["bucket"], copy),
                         {"write_enabled": "true", "buffer_path": str(tmp / "buf"),
                          "compaction_levels": "off", "sync_interval": "-1"})
    writer = Child([PYTHON, "-c", WRITER, writer_uri, str(args.commit_every)], env,
                   tmp / "writer.err")
    readers: list[Child] = []
    res: dict = {"config": name, "procs": procs, "params": params}
    try:
        if writer.reply_line(120) != "ready":
            raise RuntimeError(f"writer did not start: {(tmp / 'writer.err').read_text()[-800:]}")
        synced: list[tuple[float, int]] = []  # (when, TXID) of each of the writer's syncs

        def follow_writer() -> None:
            for line in writer.proc.stdout:  # type: ignore[union-attr]
                parts = line.split()
                if len(parts) == 2 and parts[0] == "txid":
                    synced.append((time.monotonic(), int(parts[1], 16)))

        threading.Thread(target=follow_writer, daemon=True).start()
        reader_uri = vfs_uri(s3_url(proxy.url, m["bucket"], copy), params)
        max_id = m["facts"]["max_id"]
        s0, t0 = proxy_stats(proxy.url), time.monotonic()
        readers = [Child([PYTHON, str(BENCH_DIR / "fleet_child.py"), reader_uri, str(max_id),
                          str(args.seed)], env, tmp / f"reader{i}.err") for i in range(procs)]
        for r in readers:
            r.reply(120)
        s1, t1 = proxy_stats(proxy.url), time.monotonic()
        res["open"] = dict(stats_delta(s0, s1), s=t1 - t0)
        for r in readers:
            r.send(f"lookups {args.lookups}")
        outs = [r.reply(args.timeout) for r in readers]
        s2, t2 = proxy_stats(proxy.url), time.monotonic()
        res["busy"] = dict(stats_delta(s1, s2), s=t2 - t1, wall_s=max(o["s"] for o in outs),
                           us_per_lookup=sorted(o["us_per_lookup"] for o in outs)[procs // 2])
        time.sleep(args.idle_seconds)  # the idle period itself is what is measured
        s3, t3 = proxy_stats(proxy.url), time.monotonic()
        res["idle"] = dict(stats_delta(s2, s3), s=t3 - t2)
        for r in readers:
            r.send("read")
        reads = [r.reply(60) for r in readers]
        s4, t4 = proxy_stats(proxy.url), time.monotonic()
        # How old the data each read saw was: since the first sync it did not see (0: none).
        ages = []
        for x in reads:
            seen = int(x["txid"], 16)
            missed = [when for when, txid in list(synced) if txid > seen and when <= t3]
            ages.append(t3 - min(missed) if missed else 0.0)
        res["late_read"] = dict(stats_delta(s3, s4), s=t4 - t3, max_age_s=max(ages))
        for r in readers:
            r.send("stats")
        res["stats"] = [r.reply(60) for r in readers]
        res["disk"] = {"cache_dir": du(tmp / "cache"), "hydration": du(tmp / "hyd")}
    finally:
        for r in readers:
            r.stop()
        writer.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        req = urllib.request.Request(ctl % ("delete", urllib.parse.urlencode(
            {"bucket": m["bucket"], "prefix": copy + "/"})), data=b"", method="POST")
        try:
            urllib.request.urlopen(req, timeout=120).read()
        except OSError:
            pass
    return res


CONFIGS = {
    # name: (processes, URI parameters); {tmp} is the configuration's private directory
    "1p": (1, {}),
    "1p-cache": (1, {"cache_dir": "{tmp}/cache"}),
    "1p-hyd": (1, {"hydration_path": "{tmp}/hyd/h.db"}),
    "1p-cache-hyd": (1, {"cache_dir": "{tmp}/cache", "hydration_path": "{tmp}/hyd/h.db"}),
    "8p": (8, {}),
    "8p-cache": (8, {"cache_dir": "{tmp}/cache"}),
    "8p-hyd": (8, {"hydration_path": "{tmp}/hyd/h.db"}),
    "8p-cache-hyd": (8, {"cache_dir": "{tmp}/cache", "hydration_path": "{tmp}/hyd/h.db"}),
}


def render(meta: dict, results: list[dict]) -> str:
    def per_min(phase: dict, kind: str) -> str:
        n = phase["counts"].get(kind, 0)
        return f"{n} ({n / phase['s'] * 60:.0f}/min)"

    lines = [
        f"Command: `{meta['command']}` — {meta['date']}, {meta['software']}; "
        f"{meta['latency_ms']:g} ms added per request; writer commits every "
        f"{meta['commit_every']:g} s; {meta['lookups']} lookups per reader; idle "
        f"{meta['idle_s']:g} s; extra URI parameters: `{meta['extra'] or 'none'}`.",
        "",
        "| config | procs | open: requests | busy: GET | busy: LIST | busy: MB | busy: wall s "
        "(median µs/lookup) | idle: LIST | idle: GET | late read: LIST, data age s | "
        "disk: cache_dir, hydration |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['config']} | {r['procs']} | error: {r['error'][:120]} |"
                         + " |" * 8)
            continue
        b, i, lr = r["busy"], r["idle"], r["late_read"]
        lines.append(
            f"| {r['config']} | {r['procs']} | {r['open']['requests']} "
            f"| {b['counts'].get('GET', 0) + b['counts'].get('GET_RANGE', 0)} "
            f"| {per_min(b, 'LIST')} | {b['bytes_down'] / 1e6:.1f} "
            f"| {b['wall_s']:.1f} ({b['us_per_lookup']:.0f}) "
            f"| {per_min(i, 'LIST')} | {i['counts'].get('GET', 0) + i['counts'].get('GET_RANGE', 0)} "
            f"| {lr['counts'].get('LIST', 0)}, {lr['max_age_s']:.1f} "
            f"| {r['disk']['cache_dir'] / 1e6:.1f} MB, {r['disk']['hydration'] / 1e6:.1f} MB |")
    lines += ["", "Per reader at the end (`ltxvfs.stats`): polls / LISTs made / shared records "
              "used / current poll interval (s):", ""]
    for r in results:
        if "stats" in r:
            cells = [f"{s['polls']}/{s.get('poll_lists', '?')}/{s.get('poll_shared', '?')}/"
                     f"{s.get('poll_interval', '?')}" for s in r["stats"]]
            lines.append(f"* {r['config']}: " + ", ".join(cells))
    return "\n".join(lines)


def write_doc(path: Path, body: str) -> None:
    begin, end = "<!-- BEGIN GENERATED fleet -->", "<!-- END GENERATED fleet -->"
    text = path.read_text()
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{begin}\n{body}\n{end}{tail}"
    else:
        text += f"\n{begin}\n{body}\n{end}\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--params", default="",
                    help="extra URI parameters for every reader, e.g. "
                         "poll_interval=1s&idle_poll_interval=30s")
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--idle-seconds", type=float, default=60.0)
    ap.add_argument("--commit-every", type=float, default=1.0)
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--dataset", default="small")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--timeout", type=float, default=600.0, help="bound of one phase")
    ap.add_argument("--ltxvfs", default="HEAD")
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/ltxvfs-bench"))
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "fleet.json")
    args, _ = ap.parse_known_args(argv)
    import dataset
    import run

    t_start = time.monotonic()
    data = args.data_dir
    (data / "logs").mkdir(parents=True, exist_ok=True)
    work = data / "work"
    work.mkdir(exist_ok=True)
    label, pythonpath = export_ltxvfs(args.ltxvfs, data / "src")
    env = child_env({"PYTHONPATH": str(pythonpath)} if pythonpath else {})
    extra = dict(urllib.parse.parse_qsl(args.params))
    stub = start_stub(data / "s3", data / "logs" / "s3stub.log")
    proxy = None
    results = []
    try:
        m = dataset.build(args.dataset, run.DATASETS[args.dataset], data, stub.url, log=log)
        proxy = start_proxy(stub.url, args.latency_ms, data / "logs" / "proxy.log")
        for name in args.configs.split(","):
            procs, params = CONFIGS[name]
            try:
                res = run_config(name, procs, {**params, **extra}, m, stub, proxy, work, env,
                                 args)
            except (RuntimeError, TimeoutError, OSError) as err:
                res = {"config": name, "procs": procs, "error": str(err)}
            results.append(res)
            log(f"{name}: " + json.dumps({k: res.get(k) for k in ("busy", "idle", "late_read",
                                                                  "disk", "error")}))
    finally:
        if proxy is not None:
            proxy.stop()
        stub.stop()
    meta = {"command": "python bench/run.py --suite fleet " + " ".join(
                a for a in (argv if argv is not None else sys.argv[1:]) if a != "--suite"
                and a != "fleet"),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "software": f"ltxvfs {label}", "latency_ms": args.latency_ms,
            "commit_every": args.commit_every, "lookups": args.lookups,
            "idle_s": args.idle_seconds, "extra": args.params,
            "wall_s": time.monotonic() - t_start}
    body = render(meta, results)
    print(body)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    if str(args.doc) != "-":
        write_doc(args.doc, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
