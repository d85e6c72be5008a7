"""How fast can each strategy move at ESSA's size? A synthetic, noisy linear fitness at n = 1920.

ESSA's first generations see a fitness that is roughly linear in the offset (a small step from the
SFT point) and noisy (a mini-batch). This measures, for every strategy at the same σ₀ and
population, over G generations: progress of the mean along the signal direction (in units of σ₀),
the mean's distance off that direction (random drift), and σ at the end relative to σ₀.
Fitness f(x) = w·x/σ₀ + noise·N(0,1), w a random unit vector. Prints one JSON object:

    python benchmarks/bench_strategies.py --dim 1920 --popsize 8 --generations 30 --noise 0.5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1920)
    ap.add_argument("--popsize", type=int, default=8)
    ap.add_argument("--generations", type=int, default=30)
    ap.add_argument("--noise", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)

    from essa.strategies import make_strategy

    variants = {"cma": ("cma", {}), "cma_lr_adapt": ("cma", {"lr_adapt": True}), "sep_cma": ("sep_cma", {}),
                "nes_sgd": ("nes", {}), "nes_adam": ("nes", {"optimizer": "adam"})}
    sigma0 = 0.1
    t0 = time.perf_counter()
    out = {"benchmark": "strategies", "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
           "cpu": platform.processor() or platform.machine(), "load_average_start": os.getloadavg(),
           "dim": args.dim, "popsize": args.popsize, "generations": args.generations, "sigma0": sigma0,
           "results": {}}
    for noise in args.noise:
        for name, (strategy, opts) in variants.items():
            prog, drift, sig = [], [], []
            for seed in range(args.seeds):
                rng = np.random.default_rng(100 + seed)
                w = rng.standard_normal(args.dim)
                w /= np.linalg.norm(w)
                es = make_strategy(strategy, args.dim, args.popsize, sigma0, seed, **opts)
                for _ in range(args.generations):
                    X = es.ask()
                    es.tell(X, X @ w / sigma0 + noise * rng.standard_normal(len(X)))
                m = es.mean
                along = float(m @ w)
                prog.append(along / sigma0)
                drift.append(float(np.linalg.norm(m - along * w)) / sigma0)
                sig.append(es.sigma / sigma0)
            out["results"][f"{name}/noise={noise:g}"] = {
                "progress_sigma0": round(float(np.mean(prog)), 2), "drift_sigma0": round(float(np.mean(drift)), 2),
                "sigma_ratio_end": round(float(np.mean(sig)), 3)}
            print(json.dumps({name: out["results"][f"{name}/noise={noise:g}"], "noise": noise}), file=sys.stderr)
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
