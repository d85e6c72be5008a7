"""Ways of prefilling the native engine's rows, alternated in one process (issue 15).

The native engine (fast path) generates for K candidates × P GSM8K prompts (greedy, SmolLM2 fp32) with each
``--variants`` entry, ``--repeats`` times each, alternated: ``padded`` (one batch padded to the longest
prompt, the old behaviour), ``groups`` (length groups, `essa.fast_decode.length_groups`, 15 %), ``prefix``
(length groups and the shared prompt prefix prefilled once per candidate, `shared_prefix`), all three with
plain `F.linear` weights; ``packed`` (``prefix`` with oneDNN-packed weights on the CPU, `pack_weight`: the default).
Each variant is a `FastDecoder` built with its options (no fused weight copies, the CPU default).
Prints one JSON object: tok/s per run and, per setting, the median ratio of each variant to the first.

    python benchmarks/bench_prefill_groups.py --batches 64 256 --new-tokens 64 --variants padded groups
    python benchmarks/bench_prefill_groups.py --batches 64 256 --new-tokens 64 --variants prefix packed
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

VARIANTS = {"padded": dict(prefill_waste=1e9, share_prefix=False, pack=False, fuse_budget_bytes=0),
            "groups": dict(prefill_waste=0.15, share_prefix=False, pack=False, fuse_budget_bytes=0),
            "prefix": dict(prefill_waste=0.15, share_prefix=True, pack=False, fuse_budget_bytes=0),
            "packed": dict(prefill_waste=0.15, share_prefix=True, pack=True, fuse_budget_bytes=0)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--candidates", type=int, default=16, help="population modes: K candidates × batch/K prompts")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=["padded", "groups"], choices=list(VARIANTS))
    args = ap.parse_args()

    from essa.chat import chat_prompts
    from essa.engine import PopulationEngine
    from essa.fast_decode import FastDecoder, length_groups, shared_prefix
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
                for name in args.variants:
                    opts = VARIANTS[name]
                    eng = PopulationEngine(copy.deepcopy(model), tok, genome if pop else None)
                    eng._fast = FastDecoder(eng.model, eng.wrappers, **opts)  # the variant's decoder
                    eng.generate(ids[:1], None if cands is None else cands[:1], SamplingConfig(max_new_tokens=4))
                    u0, t = eng.stats.useful_tokens, time.perf_counter()
                    eng.generate(ids[:P], cands, SamplingConfig(max_new_tokens=args.new_tokens))
                    dt = time.perf_counter() - t
                    tok_s = (eng.stats.useful_tokens - u0) / dt
                    seqs = [ids[p] for _ in range(K) for p in range(P)]
                    c = shared_prefix(seqs, [k for k in range(K) for _ in range(P)]) if opts["share_prefix"] else 0
                    rest = [n - c for n in rows]
                    groups = length_groups(rest, opts["prefill_waste"])
                    rec = {"batch": batch, "candidates": K, "prompts": P, "variant": name, **opts, "seconds": round(dt, 2),
                           "tok_s": round(tok_s, 1), "groups": len(groups), "shared_prefix": c,
                           "prefill_tokens_computed": sum(rest[g[0]] * len(g) for g in groups) + c * K,
                           "prompt_tokens": sum(rows), "load_average": round(os.getloadavg()[0], 2)}
                    result["runs"].append(rec)
                    speeds.setdefault(name, []).append(tok_s)
                    print(json.dumps(rec), file=sys.stderr, flush=True)
                    del eng
            key = f"{batch} rows, {'K=%d candidates' % K if pop else 'base'}"
            base = args.variants[0]
            result["ratios"][key] = {f"{name}/{base}": round(statistics.median(
                a / b for a, b in zip(speeds[name], speeds[base])), 3) for name in args.variants[1:]}
    result["load_average_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
