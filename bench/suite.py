"""``python bench/run.py --suite workloads``: the workload suite (issue 13), its ideal, its report.

For every run, dataset and workload of bench/workloads.py: the plan is traced on the local copy
(bench/pagetrace.py: pages touched, LRU and OPT misses at the workload's cache size), then one fresh
child per system runs it through the latency proxy. The report goes between
``<!-- BEGIN/END GENERATED workloads -->`` in docs/benchmarks.md, the raw results to
bench/results/workloads.json.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time

import dataset
import pagetrace as page_trace
import workloads
from common import BENCH_DIR, export_ltxvfs, s3_url, start_proxy, start_stub
from workloads import DEFAULT_CACHE, SUITE


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ideal(m: dict, name: str, params: dict, seed: int) -> dict:
    """The workload's trace on the local copy, simulated at its cache size: flat metrics."""
    facts = m["facts"]
    plan = workloads.make_plan(name, facts, params, seed)
    cache = workloads.cache_bytes(SUITE[name], facts) or DEFAULT_CACHE
    t0 = time.monotonic()
    traced = page_trace.trace_plan(m["local_db"], plan, facts["page_size"])
    sim = page_trace.simulate(traced, cache // facts["page_size"])
    out = {"trace_s": time.monotonic() - t0, "cache_pages": cache // facts["page_size"]}
    for ph in sim:
        for k, v in ph.items():
            if k != "phase":
                out[f"{ph['phase']}.{k}"] = v
    return out


def main(args, argv: list[str] | None, run) -> int:
    """``run`` is bench/run.py (its child runner, statistics and report helpers)."""
    t_start = time.monotonic()
    datasets = args.datasets.split(",") if args.datasets else ["small"]
    systems = args.systems.split(",")
    asked = [w for w in (args.workloads or "").split(",") if w]
    for w in asked:
        if w not in SUITE:
            raise SystemExit(f"unknown suite workload {w!r}; known: {', '.join(SUITE)}")
    params = {"hot_keys": args.hot_keys, "suite_lookups": args.lookups,
              "zipf_lookups": args.zipf_lookups, "zipf_s": 1.1, "thread_keys": 400,
              "thread_cap_s": 300}
    data = args.data_dir
    (data / "logs").mkdir(parents=True, exist_ok=True)
    work = data / "work"
    work.mkdir(exist_ok=True)
    label, pythonpath = export_ltxvfs(args.ltxvfs, data / "src")
    _log(f"ltxvfs under test: {label}")
    stub = start_stub(data / "s3", data / "logs" / "s3stub.log")
    proxy = None
    results: list[dict] = []
    ideals: list[dict] = []
    manifests: dict[str, dict] = {}
    try:
        for ds in datasets:
            t0 = time.monotonic()
            manifests[ds] = dataset.build(ds, run.DATASETS[ds], data, stub.url,
                                          rebuild=args.rebuild, log=_log)
            manifests[ds]["plan"] = run.restore_plan(manifests[ds]["ltx_files"])
            _log(f"dataset {ds} ready in {time.monotonic() - t0:.1f}s")
        proxy = start_proxy(stub.url, args.latency_ms, data / "logs" / "proxy.log")
        _log(f"stand-in {stub.url}, proxy {proxy.url} ({args.latency_ms:g} ms)")
        for r in range(args.runs):
            for ds in datasets:
                m = manifests[ds]
                url = s3_url(proxy.url, m["bucket"], m["prefix"])
                seed = 1000 * r + 7
                for name in asked or workloads.DEFAULT_WORKLOADS.get(ds, tuple(SUITE)):
                    idl = ideal(m, name, params, seed)
                    ideals.append({"run": r, "dataset": ds, "workload": name, "ideal": idl})
                    for system in systems:
                        spec = {"dataset": m, "replica_url": url, "endpoint": proxy.url,
                                "params": dict(params, suite_workload=name), "seed": seed}
                        env = run.child_env_for(system, url, pythonpath)
                        res = run.run_child(system, "suite", spec, work, env,
                                            timeout=args.suite_timeout)
                        results.append({"run": r, "dataset": ds, "workload": name,
                                        "system": system, "result": res})
                        _log(f"run {r + 1}/{args.runs} {ds:5} {name:12} {system:6} "
                             + brief(name, res))
    finally:
        if proxy is not None:
            proxy.stop()
        stub.stop()
    summary = run.summarize(results)
    ideal_sum = run.summarize([{"dataset": i["dataset"], "workload": i["workload"],
                                "system": "ideal", "result": i["ideal"]} for i in ideals])
    summary.update(ideal_sum)
    machine, software = run.machine_info()
    meta = {"command": "python bench/run.py " + " ".join(argv if argv is not None
                                                        else sys.argv[1:]),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine, "software": software + f"; ltxvfs {label}",
            "latency_ms": args.latency_ms, "runs": args.runs, "params": params,
            "wall_s": time.monotonic() - t_start}
    body = render(meta, summary, datasets, manifests, systems, asked, run)
    print(body)
    out_json = args.json or (BENCH_DIR / "results" / "workloads.json")
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"meta": meta, "results": results, "ideals": ideals,
                                    "manifests": manifests}, indent=1, default=str))
    if str(args.doc) != "-":
        run.write_doc(args.doc, "workloads", body)
        _log(f"wrote {args.doc} and {out_json}")
    _log(f"total {time.monotonic() - t_start:.0f}s")
    return 0


def brief(name: str, res: dict) -> str:
    if "error" in res:
        return "ERROR " + res["error"].strip().splitlines()[-1][:300]
    parts = []
    for ph in SUITE[name].report:
        us, f, b = res.get(f"{ph}.op_us"), res.get(f"{ph}.fetches"), res.get(f"{ph}.bytes")
        parts.append(f"{ph}: {us or 0:.0f}µs/op total={res.get(f'{ph}.total_s', 0):.2f}s "
                     f"fetches={f} bytes={b}")
    return "; ".join(parts) + f" ({res.get('wall_s', 0):.0f}s)"


def _hit_rate(g: dict, ph: str, idl: dict, threads: int = 1) -> str:
    """ltxvfs's cache hit rate from litestream_stats, and without SQLite's change-counter reads
    of page 1 (one per transaction: always hits, counted as such by the cache; the trace runs
    one thread, so ``threads`` connections make ``threads`` times as many)."""
    hits, misses = g.get(f"{ph}.cache_hits"), g.get(f"{ph}.cache_misses")
    if hits is None or misses is None or hits + misses == 0:
        return "–"
    raw = hits / (hits + misses)
    if g.get(f"{ph}.header_reads") is not None:  # ltxvfs keeps them out of cache_hits itself
        return f"{raw * 100:.0f}%"
    hdr = (idl.get(f"{ph}.header_reads") or 0) * threads
    data_hits = hits - hdr
    if hdr and data_hits >= 0 and data_hits + misses > 0:
        return f"{raw * 100:.0f}% ({data_hits / (data_hits + misses) * 100:.0f}%)"
    return f"{raw * 100:.0f}%"


def render(meta: dict, summary: dict, datasets: list[str], manifests: dict,
           systems: list[str], asked: list[str], run) -> str:
    fmt, hb = run.fmt, run.human_bytes
    L: list[str] = []  # noqa: N806
    L.append(f"Command: `{meta['command']}`  ")
    L.append(f"Date: {meta['date']}  ")
    L.append(f"Machine: {meta['machine']}  ")
    L.append(f"Software: {meta['software']}  ")
    L.append(f"Setup: latency proxy {meta['latency_ms']:g} ms per request; {meta['runs']} run(s), "
             f"medians shown; each (run, dataset, workload, system) in a fresh process; cache "
             f"sizes in bytes on both VFSes (`cache_size` URI parameter; Go: one LRU per "
             f"connection, ltxvfs: one per replica); wall time {meta['wall_s']:.0f} s.")
    L.append("")
    for ds in datasets:
        m = manifests[ds]
        f = m["facts"]
        db = f["page_count"] * f["page_size"]
        L.append(f"#### Dataset `{ds}`: {f['page_count']} pages × {f['page_size']} B = "
                 f"{hb(db)}, {f['rows']} rows (built in {m.get('build_seconds', '?')} s)")
        L.append("")
        L.append("| workload · phase | cache | per op: ltxvfs | Go | local | total: ltxvfs | Go | "
                 "local | fetches: ltxvfs | Go | ideal LRU / OPT / first-touch pages | "
                 "bytes: ltxvfs | Go | ltxvfs hit rate (data pages) | LRU hit rate |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        names = [w for w in (asked or workloads.DEFAULT_WORKLOADS.get(ds, tuple(SUITE)))]
        notes = []
        for name in names:
            suite = SUITE[name]
            idl = summary.get((ds, name, "ideal"), {})
            cache = idl.get("cache_pages")
            cache_s = (f"{hb(cache * f['page_size'])} (db {db / (cache * f['page_size']):.0f}×)"
                       if cache else "–")
            for ph in suite.report:
                g = {s: summary.get((ds, name, s), {}) for s in systems}
                cells = [f"{name} · {ph}", cache_s]
                for key, unit in (("op_us", "us"), ("total_s", "s")):
                    for s in ("ltxvfs", "go", "local"):
                        v = g.get(s, {}).get(f"{ph}.{key}")
                        if suite.cold and key == "total_s":
                            v = g.get(s, {}).get("first_row_s")  # open included
                        cells.append(fmt(v / 1e3, "ms") if unit == "us" and v is not None
                                     and v >= 1e4 else fmt(v, unit))
                for s in ("ltxvfs", "go"):
                    cells.append(fmt(g.get(s, {}).get(f"{ph}.fetches"), "n"))
                cells.append(f"{fmt(idl.get(f'{ph}.lru_misses'), 'n')} / "
                             f"{fmt(idl.get(f'{ph}.opt_misses'), 'n')} / "
                             f"{fmt(idl.get(f'{ph}.distinct'), 'n')}")
                for s in ("ltxvfs", "go"):
                    cells.append(hb(g.get(s, {}).get(f"{ph}.bytes")))
                cells.append(_hit_rate(g.get("ltxvfs", {}), ph, idl, suite.threads))
                lr = idl.get(f"{ph}.lru_hit_rate")
                cells.append("–" if lr is None else f"{lr * 100:.0f}%")
                L.append("| " + " | ".join(cells) + " |")
                for s in ("ltxvfs", "go", "local"):
                    clean = g.get(s, {}).get(f"{ph}.clean_ops")
                    if clean is not None and s != "local":
                        notes.append((name, ph, s, clean, idl.get(f"{ph}.lru_op_clean")))
        L.append("")
        extra = _extras(summary, ds, names, systems, notes, run)
        L.extend(extra)
        for s in ("ltxvfs", "go", "local"):
            for name in names:
                errs = summary.get((ds, name, s), {}).get("errors") or []
                for e in errs[:2]:
                    last = e.strip().splitlines()[-1] if e.strip() else e
                    L.append(f"- error: {ds} / {name} / {s}: `{last[:300]}`")
        L.append("")
    return "\n".join(L)


def _extras(summary: dict, ds: str, names: list[str], systems: list[str], notes: list,
            run) -> list[str]:
    """The hot set after the scan, the threads against one thread, requests by kind."""
    fmt, hb = run.fmt, run.human_bytes
    L: list[str] = []  # noqa: N806
    if notes:
        L.append("Share of the hot set's lookups answered **without a request** (hot_scan):")
        L.append("")
        L.append("| phase | system | share without a request | LRU of the same size | ideal |")
        L.append("|---|---|---|---|---|")
        for _name, ph, s, clean, lru in notes:
            L.append(f"| {ph} | {s} | {clean * 100:.0f}% | "
                     f"{'–' if lru is None else f'{lru * 100:.0f}%'} | 100% (the hot set fits) |")
        L.append("")
    if "threads8" in names and "threads1" in names:
        L.append("Threads: 8 threads × the same 400 keys (own connection each) against one thread "
                 "× 400 keys:")
        L.append("")
        L.append("| system | fetches 1 thread | fetches 8 threads | ratio | bytes 8 threads | "
                 "wall 1 thread | wall 8 threads | lookups/s 8 threads |")
        L.append("|---|---|---|---|---|---|---|---|")
        for s in systems:
            a, b = summary.get((ds, "threads1", s), {}), summary.get((ds, "threads8", s), {})
            L.append(f"| {s} | {fmt(a.get('lookups.fetches'), 'n')} | "
                     f"{fmt(b.get('lookups.fetches'), 'n')} | "
                     f"{run.ratio(b.get('lookups.fetches'), a.get('lookups.fetches'))} | "
                     f"{hb(b.get('lookups.bytes'))} | {fmt(a.get('lookups.total_s'), 's')} | "
                     f"{fmt(b.get('lookups.total_s'), 's')} | "
                     f"{fmt(b.get('lookups.lookups_per_s'), 'n')} |")
        idl = summary.get((ds, "threads1", "ideal"), {})
        L.append(f"| ideal | {fmt(idl.get('lookups.distinct'), 'n')} pages | same | 1× | | | | |")
        L.append("")
    L.append("Requests by kind (all phases of a workload, open included), ltxvfs / Go:")
    L.append("")
    L.append("| workload | ltxvfs | Go | ltxvfs open | Go open |")
    L.append("|---|---|---|---|---|")
    for name in names:
        cells = [name]
        for s in ("ltxvfs", "go"):
            g = summary.get((ds, name, s), {})
            kinds: dict[str, float] = {}
            for k, v in g.items():
                if ".kind_" in k and v:
                    kind = k.split(".kind_", 1)[1]
                    kinds[kind] = kinds.get(kind, 0) + v
            cells.append(", ".join(f"{k} {v:.0f}" for k, v in sorted(kinds.items())) or "–")
        for s in ("ltxvfs", "go"):
            g = summary.get((ds, name, s), {})
            cells.append(f"{fmt(g.get('open_requests'), 'n')} req, {fmt(g.get('open_s'), 's')}")
        L.append("| " + " | ".join(cells) + " |")
    L.append("")
    return L
