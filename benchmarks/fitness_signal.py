"""Does a mini-batch fitness rank ESSA candidates consistently? (issue 11: fitness with signal)

K candidates (offsets ~ N(0, sigma^2 I) around an SFT adapter) are scored on B disjoint mini-batches of
training prompts each, greedy and sampled. If fitness carries signal about the candidate, its ranking
repeats from batch to batch: reported as the mean pairwise Spearman correlation across batches and the
intra-class correlation (two-way ANOVA without replication: the share of fitness variance that belongs
to the candidate, not to the batch x candidate noise). Prints one JSON object.

    python benchmarks/fitness_signal.py --adapter runs/ifeval/sft --data runs/study/train.jsonl \\
        --task ifeval --sigma 0.211 --candidates 8 --batches 3 --batch-size 16 --max-new-tokens 160
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time

import numpy as np


def spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if np.std(ra) == 0 or np.std(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def icc(f: np.ndarray) -> dict:
    """f: [B batches, K candidates]. ICC(3,1)-style share of candidate variance, and the F test statistic."""
    B, K = f.shape
    grand = f.mean()
    ss_cand = B * ((f.mean(0) - grand) ** 2).sum()
    ss_batch = K * ((f.mean(1) - grand) ** 2).sum()
    ss_res = ((f - grand) ** 2).sum() - ss_cand - ss_batch
    ms_cand, ms_res = ss_cand / (K - 1), ss_res / max(1, (K - 1) * (B - 1))
    return {"icc": float((ms_cand - ms_res) / (ms_cand + (B - 1) * ms_res)) if ms_cand + ms_res > 0 else float("nan"),
            "F": float(ms_cand / ms_res) if ms_res > 0 else float("inf"), "df": [K - 1, (K - 1) * (B - 1)]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--task", default="ifeval")
    ap.add_argument("--data", required=True, help="training rows (.jsonl) of the task")
    ap.add_argument("--sigma", type=float, required=True, help="offset std (e.g. a run's calibrated sigma0)")
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--temperature", type=float, default=0.7, help="the sampled mode's temperature")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", default=["greedy", "sampled"], choices=["greedy", "sampled"])
    args = ap.parse_args()

    from scipy.stats import f as f_dist

    from essa.chat import chat_prompts
    from essa.engine import EngineConfig
    from essa.engines import build_engine
    from essa.rewards import score_completions
    from essa.sampling import SamplingConfig
    from essa.tasks import get_task, load_rows

    task = get_task(args.task)
    rows = load_rows(task, args.data)
    rng = np.random.default_rng(args.seed)
    idx = rng.choice(len(rows), args.batches * args.batch_size, replace=False).reshape(args.batches, args.batch_size)
    engine = build_engine(args.model, args.adapter, EngineConfig(device="cpu"))
    X = rng.normal(0.0, args.sigma, size=(args.candidates, engine.genome.dimension))
    ids = chat_prompts(engine.tokenizer, [r["prompt"] for r in rows], task.system_prompt)
    load0 = os.getloadavg()
    out = {"command": " ".join(sys.argv), "device": "cpu", "python": platform.python_version(), "load_average_start": load0,
           "task": args.task, "candidates": args.candidates, "batches": args.batches, "batch_size": args.batch_size,
           "sigma": args.sigma, "max_new_tokens": args.max_new_tokens, "modes": {}}
    for mode, temp in (("greedy", 0.0), ("sampled", args.temperature)):
        if mode not in args.modes:
            continue
        t0 = time.perf_counter()
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=temp, top_p=1.0, seed=args.seed)
        fit = np.zeros((args.batches, args.candidates))
        for b in range(args.batches):
            pairs = [(k, int(i)) for k in range(args.candidates) for i in idx[b]]
            comps = engine.generate_pairs(ids, X, pairs, sampling)
            scores, _, _ = score_completions(task.reward, [rows[i] for _, i in pairs], [c[0].text for c in comps])
            fit[b] = np.asarray(scores).reshape(args.candidates, args.batch_size).mean(1)
        rhos = [spearman(fit[a], fit[b]) for a, b in itertools.combinations(range(args.batches), 2)]
        st = icc(fit)
        st["p_value"] = float(f_dist.sf(st["F"], *st["df"])) if np.isfinite(st["F"]) else 0.0
        out["modes"][mode] = {"fitness": fit.round(4).tolist(), "spearman_pairs": [round(r, 3) for r in rhos],
                              "spearman_mean": float(np.nanmean(rhos)), **st,
                              "between_candidate_std": float(fit.mean(0).std(ddof=1)),
                              "within_batch_std_of_candidates": float(fit.std(1, ddof=1).mean()),
                              "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps({mode: out["modes"][mode]}), file=sys.stderr)
    out["load_average_end"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
