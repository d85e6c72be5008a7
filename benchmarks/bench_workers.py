"""Generations per hour and tokens/s against the number of workers (issue 16), back to back in one process.

Modes, each running the same ESSA generations (same candidates, prompts, greedy decoding, task reward):
  process-1t   in this process (`distributed.workers: 0`), 1 torch thread
  process-2t   in this process, 2 torch threads
  ray-1        1 Ray worker (1 CPU, so 1 thread)
  ray-2        2 Ray workers (1 CPU each)
and checks that every mode returns the same fitness. From the measured seconds per completion η it fills
the paper's latency model, T_gen = N_pop·B·η/G + T_comm, for G = 8/16/128 workers: ESSA sends offsets and
reward sums (bytes measured here), a gradient method all-reduces its weights every step (ring all-reduce,
2·(G−1)/G·P·2 bytes at --link-gbps). A projection, not a measurement. Prints one JSON object.

    python benchmarks/bench_workers.py --popsize 8 --batch-size 8 --max-new-tokens 48 --generations 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--generations", type=int, default=3, help="timed generations per mode (after one warm-up)")
    ap.add_argument("--modes", nargs="+", default=["process-1t", "process-2t", "ray-1", "ray-2"])
    ap.add_argument("--device", default="cpu", help="cpu | cuda (the process modes measure one GPU's eta)")
    ap.add_argument("--link-gbps", type=float, default=100.0, help="projection: inter-node bandwidth, Gbit/s")
    ap.add_argument("--proj-popsize", type=int, default=32, help="projection: N_pop")
    ap.add_argument("--proj-batch", type=int, default=100, help="projection: prompts per mini-batch B")
    ap.add_argument("--project-from", metavar="JSON", help="only recompute the projection of an earlier result")
    args = ap.parse_args()
    if args.project_from:
        out = json.load(open(args.project_from))
        out["projection"] = project(out, args)
        out["projection_command"] = " ".join(sys.argv)
        print(json.dumps(out))
        return

    import torch

    from essa.distributed import DistributedConfig, PromptSet, WorkerSpec, make_pool
    from essa.engine import EngineConfig
    from essa.genome import load_genome
    from essa.models import load_model
    from essa.sampling import SamplingConfig
    from essa.tasks import get_task, split_rl_data

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from helpers import random_adapter

    tmp_dir = tempfile.TemporaryDirectory(prefix="bench-workers-")  # removed when the process exits
    tmp = tmp_dir.name
    model, _ = load_model(args.model, device="cpu", dtype="float32")
    random_adapter(model, f"{tmp}/adapter", std=0.02)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    task = get_task("gsm8k")
    _, rows = split_rl_data(task, None, 8, 0)
    rows = rows[: args.batch_size * (args.generations + 1)]
    dim = load_genome(f"{tmp}/adapter").dimension
    rng = np.random.default_rng(0)
    X = [rng.normal(0, 0.05, (args.popsize, dim)) for _ in range(args.generations + 1)]
    batches = [[(k, g * args.batch_size + i) for k in range(args.popsize) for i in range(args.batch_size)]
               for g in range(args.generations + 1)]
    spec = WorkerSpec(args.model, f"{tmp}/adapter", EngineConfig(device=args.device), system_prompt=task.system_prompt,
                      prompt_sets={"train": PromptSet([r["prompt"] for r in rows], args.max_new_tokens, "training", rows)},
                      reward="gsm8k")
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)"
    out = {"command": " ".join(sys.argv), "device": device, "python": platform.python_version(),
           "torch": torch.__version__, "load_average_start": os.getloadavg(),
           "popsize": args.popsize, "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
           "generations": args.generations, "modes": {}}
    fitness = {}
    for mode in args.modes:
        torch.set_num_threads(2 if mode == "process-2t" else 1)
        workers = int(mode.split("-")[1]) if mode.startswith("ray") else 0
        t0 = time.perf_counter()
        pool = make_pool(spec, DistributedConfig(workers=workers))
        start_s = time.perf_counter() - t0
        try:
            pool.fitness("train", X[0], batches[0], sampling, 0)  # warm-up
            secs, toks, wire, fits = [], [], [], []
            for g in range(1, args.generations + 1):
                t = time.perf_counter()
                fit = pool.fitness("train", X[g], batches[g], sampling, 0)
                secs.append(time.perf_counter() - t)
                toks.append(fit.tokens)
                wire.append(fit.wire_down + fit.wire_up)
                fits.append(fit.values.tolist())
        finally:
            pool.close()
        fitness[mode] = fits
        med = statistics.median(secs)
        out["modes"][mode] = {"workers": workers, "start_seconds": round(start_s, 1),
                              "seconds_per_generation": [round(s, 2) for s in secs],
                              "generations_per_hour": round(3600 / med, 1),
                              "tokens_per_second": round(sum(toks) / sum(secs), 1),
                              "seconds_per_completion": round(sum(secs) / (args.generations * len(batches[0])), 4),
                              "wire_bytes_per_generation": int(statistics.median(wire))}
        print(json.dumps({mode: out["modes"][mode]}), file=sys.stderr)
    out["load_average_end"] = os.getloadavg()
    ref = next(iter(fitness.values()))
    out["same_fitness_every_mode"] = all(f == ref for f in fitness.values())
    base = out["modes"].get("process-1t")
    for mode, m in out["modes"].items():
        if base:
            m["speedup_vs_process_1t"] = round(statistics.median(base["seconds_per_generation"])
                                               / statistics.median(m["seconds_per_generation"]), 2)
    out["model_params"] = n_params
    out["projection"] = project(out, args)
    print(json.dumps(out))


def project(out: dict, args) -> dict | None:
    """The paper's latency model filled with η of one Ray worker measured here: per generation
    T = N·B·η/G + T_comm. ESSA's traffic: per candidate the bytes measured with 1 worker (offsets, index
    pairs, reward sums) + per extra share the bytes measured going from 1 to 2 workers, all through the
    driver's link; a gradient method all-reduces its bf16 weights each step (ring: 2·(G−1)/G·P·2 bytes)."""
    one, two = out["modes"].get("ray-1") or out["modes"].get("process-1t"), out["modes"].get("ray-2")
    if not one:
        return None
    eta, link = one["seconds_per_completion"], args.link_gbps * 1e9 / 8
    per_candidate = one["wire_bytes_per_generation"] / out["popsize"]
    per_share = (two["wire_bytes_per_generation"] - one["wire_bytes_per_generation"]) if two and one["workers"] else 0
    N, B, P = args.proj_popsize, args.proj_batch, out["model_params"]
    rows = []
    for G in (1, 8, 16, 128):
        gen = N * B * eta / G
        essa_bytes = N * per_candidate + (G - 1) * per_share
        allreduce = 2 * (G - 1) / G * P * 2 / link
        rows.append({"G": G, "T_gen_s": round(gen, 2), "essa_bytes": int(essa_bytes), "essa_comm_s": round(essa_bytes / link, 6),
                     "essa_step_s": round(gen + essa_bytes / link, 2), "allreduce_s": round(allreduce, 4),
                     "gradient_step_s_generation_and_allreduce_only": round(gen + allreduce, 2),
                     "allreduce_7B_s": round(2 * (G - 1) / G * 7e9 * 2 / link, 2)})
    return {"label": f"projection from eta measured here ({out['device']}, one worker), not a measurement",
            "eta_seconds_per_completion": eta, "bytes_per_candidate": round(per_candidate), "bytes_per_share": per_share,
            "N_pop": N, "B": B, "link_gbps": args.link_gbps, "model_params": P, "rows": rows}


if __name__ == "__main__":
    main()
