"""Which strategy moves a real model furthest in tens of generations? cma, LRA-CMA, sep-CMA, OpenAI-ES.

The real model (SmolLM2-135M-Instruct) with a real SFT adapter's genome (n = 1920 for r = 8, α = 1),
the same σ₀ (``sigma0: auto``'s calibration) and population for every strategy. The fitness is smooth
and cheap so that the comparison is not drowned in noise: the mean per-token log-likelihood, under
each candidate, of reference responses (teacher-forced, forward passes only) — by default the
rejection-sampled IFEval-style SFT data, whose responses follow their prompts' instructions. A
fixed training batch of rows gives the fitness (the same rows every generation: a deterministic
objective, where only the strategy differs); the mean of each strategy is scored on held-out rows
of the same file at the end (does the move generalise, or fit the batch?).

Per strategy and seed: training fitness of the mean at the end minus at the start (nats/token), the
held-out change, σ at the end / σ₀, and wall seconds of ask/tell alone (the strategy's own cost:
full CMA decomposes a 1920 x 1920 covariance). Prints one JSON object::

    python benchmarks/bench_strategies_real.py --adapter runs/ifeval/sft --data runs/ifeval/ifeval-sft.jsonl \\
        --generations 20 --popsize 8 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

VARIANTS = {"cma": ("cma", {}), "cma_lr_adapt": ("cma", {"lr_adapt": True}), "sep_cma": ("sep_cma", {}),
            "nes": ("nes", {})}


def main(argv=None):  # noqa: C901
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--data", required=True, help="jsonl with 'prompt' and 'response' (e.g. essa data ifeval-like --responses)")
    ap.add_argument("--train-rows", type=int, default=8)
    ap.add_argument("--heldout-rows", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=96, help="response tokens scored per row")
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--strategies", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--alpha", type=float, default=1.0, help="genome: top floor(alpha*r) singular values per factor")
    ap.add_argument("--sigma0", type=float, default=None, help="default: sigma0 auto's calibration on the train rows")
    args = ap.parse_args(argv)

    import torch
    import transformers

    from essa.chat import chat_prompts
    from essa.engine import PopulationEngine
    from essa.explore import DEFAULT_TARGET_KL, MovementProbe, calibrate_sigma
    from essa.genome import load_genome
    from essa.models import load_model
    from essa.strategies import make_strategy
    from essa.tasks import get_task

    rows = [json.loads(x) for x in open(args.data) if x.strip()]
    need = args.train_rows + args.heldout_rows
    if len(rows) < need:
        print(f"bench_strategies_real: {args.data} has {len(rows)} rows, need {need}; lower --train-rows/--heldout-rows",
              file=sys.stderr)
        sys.exit(2)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows))
    train = [rows[i] for i in order[:args.train_rows]]
    held = [rows[i] for i in order[args.train_rows:need]]
    model, tok = load_model(args.model, device="cpu", dtype="float32")
    genome = load_genome(args.adapter, args.alpha)
    eng = PopulationEngine(model, tok, genome)

    def encode(rs):
        p = chat_prompts(tok, [r["prompt"] for r in rs], get_task("ifeval").system_prompt)
        c = [tok(r["response"], add_special_tokens=False)["input_ids"][:args.max_tokens] for r in rs]
        return p, c

    sets = {"train": encode(train), "heldout": encode(held)}

    def loglik(which, X):
        """[K] mean per-token log-likelihood of the reference responses under each candidate."""
        p, c = sets[which]
        out = []
        for x in np.atleast_2d(X):           # one candidate at a time: [P, T, V] at most
            lp, mask = eng.completion_logprobs(p, c, x[None])
            T = mask.shape[1]
            toks = torch.tensor([ci + [0] * (T - len(ci)) for ci in c])
            ll = lp[0].gather(-1, toks.unsqueeze(-1)).squeeze(-1)
            out.append(float((ll * mask).sum() / mask.sum()))
        return np.array(out)

    t0 = time.perf_counter()
    sigma0 = args.sigma0
    if sigma0 is None:
        probe = MovementProbe(eng, sets["train"][0][:4], n_candidates=4, max_new_tokens=32, seed=0)
        sigma0, _ = calibrate_sigma(probe, DEFAULT_TARGET_KL)
    start = {k: float(loglik(k, np.zeros(genome.dimension))[0]) for k in sets}
    out = {"benchmark": "strategies-real", "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
           "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "load_average_start": os.getloadavg(), "adapter": args.adapter, "data": args.data, "alpha": args.alpha, "dim": genome.dimension,
           "popsize": args.popsize, "generations": args.generations, "sigma0": sigma0,
           "fitness": "mean per-token log-likelihood of reference responses (nats)", "sft_loglik": start, "runs": []}
    for name in args.strategies:
        strategy, opts = VARIANTS[name]
        for seed in args.seeds:
            es = make_strategy(strategy, genome.dimension, args.popsize, sigma0, seed, **opts)
            t_es, curve = 0.0, []
            for _ in range(args.generations):
                t = time.perf_counter()
                X = es.ask()
                t_es += time.perf_counter() - t
                f = loglik("train", X)
                t = time.perf_counter()
                es.tell(X, f)
                t_es += time.perf_counter() - t
                curve.append(round(float(f.mean()) - start["train"], 5))
            end = {k: float(loglik(k, es.mean)[0]) for k in sets}
            run = {"strategy": name, "seed": seed, "train_gain": round(end["train"] - start["train"], 5),
                   "heldout_gain": round(end["heldout"] - start["heldout"], 5),
                   "sigma_ratio_end": round(es.sigma / sigma0, 3), "strategy_seconds": round(t_es, 1),
                   "population_mean_gain_per_generation": curve}
            out["runs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "population_mean_gain_per_generation"}),
                  file=sys.stderr, flush=True)
    summary = {}
    for name in args.strategies:
        rs = [r for r in out["runs"] if r["strategy"] == name]
        summary[name] = {k: round(float(np.mean([r[k] for r in rs])), 5)
                         for k in ("train_gain", "heldout_gain", "sigma_ratio_end", "strategy_seconds")}
    out["summary"] = summary
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out["load_average_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
