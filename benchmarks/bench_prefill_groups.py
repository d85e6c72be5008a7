"""Prefill by length groups against one padded prefill, alternated in one process (issue 15).

The native engine (fast path) generates for K candidates × P GSM8K prompts (greedy, SmolLM2 fp32) with
``prefill_waste`` = 1e9 (one batch padded to the longest prompt, the old behaviour) and the default 0.15
(`essa.fast_decode.length_groups`), ``--repeats`` times each, alternated; prints one JSON object with the
prompt-length spread, tok/s per run and the median ratio grouped / padded per setting.

    python benchmarks/bench_prefill_groups.py --batches 64 256 --new-tokens 64
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--candidates", type=int, default=16, help="population modes: K candidates × batch/K prompts")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from essa.chat import chat_prompts
    from essa.engine import PopulationEngine
    from essa.fast_decode import length_groups
    from essa.genome import load_genome
    from essa.models import load_model
    from essa.sampling import SamplingConfig
    from essa.tasks import MATH_SYSTEM_PROMPT, get_task, load_rows

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from helpers import random_adapter

    model, tok = load_model(args.model, device="cpu", dtype="float32")
    genome = load_genome(random_adapter(model, Path(tempfile.mkdtemp(prefix="essa-bench-")) / "a", std=0.02))
    ids = chat_prompts(tok, [r["prompt"] for r in load_rows(get_task("gsm8k"), "test")], MATH_SYSTEM_PROMPT)
    result = {"benchmark": "prefill-groups", "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
              "torch": torch.__version__, "model": args.model, "new_tokens": args.new_tokens,
              "load_average_start": os.getloadavg(), "runs": [], "ratios": {}}
    for batch in args.batches:
        for pop in (False, True):
            K = min(args.candidates, batch) if pop else 1
            P = batch // K
            lens = [len(x) for x in ids[:P]]
            rows = lens * K
            cands = np.random.default_rng(0).normal(0, 0.05, (K, genome.dimension)).astype(np.float32) if pop else None
            speeds = {}
            for _ in range(args.repeats):
                for waste in (1e9, 0.15):
                    eng = PopulationEngine(copy.deepcopy(model), tok, genome if pop else None)
                    eng._fast.prefill_waste = waste
                    eng.generate(ids[:1], None if cands is None else cands[:1], SamplingConfig(max_new_tokens=4))
                    u0, t = eng.stats.useful_tokens, time.perf_counter()
                    eng.generate(ids[:P], cands, SamplingConfig(max_new_tokens=args.new_tokens))
                    dt = time.perf_counter() - t
                    tok_s = (eng.stats.useful_tokens - u0) / dt
                    groups = length_groups(rows, waste)
                    rec = {"batch": batch, "candidates": K, "prompts": P, "prefill_waste": waste, "seconds": round(dt, 2),
                           "tok_s": round(tok_s, 1), "groups": len(groups),
                           "prefill_tokens_computed": sum(rows[g[0]] * len(g) for g in groups),
                           "prompt_tokens": sum(rows), "load_average": round(os.getloadavg()[0], 2)}
                    result["runs"].append(rec)
                    speeds.setdefault(waste, []).append(tok_s)
                    print(json.dumps(rec), file=sys.stderr, flush=True)
                    del eng
            key = f"{batch} rows, {'K=%d candidates' % K if pop else 'base'}"
            result["ratios"][key] = round(statistics.median(
                g / p for g, p in zip(speeds[0.15], speeds[1e9])), 3)
    result["load_average_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
