"""How far do ESSA candidates move the model? KL, token agreement and greedy ties vs σ, per genome.

For one SFT adapter and a few training prompts, for the unbalanced and the balanced genome and a grid
of σ: n Gaussian candidates σ·z (what a strategy's first generation draws) are measured against the
SFT adapter (zero offset) on its own greedy completions —

* ``kl``: mean per-token KL(SFT ‖ candidate), teacher-forced (nats);
* ``agreement``: fraction of completion tokens where the candidate's top-1 is the SFT token;
* ``kl_A_only`` / ``kl_B_only``: the same with the offsets of only A's / only B's singular values;
* ``greedy_differs``: how many of the n candidates' greedy completions differ from the SFT one
  (any prompt) — a candidate identical to SFT on every prompt scores exactly as SFT (a tie);
* and ``sigma0 auto``'s choice for the default target.

Prints one JSON object (device, versions, command, load average, numbers)::

    python benchmarks/bench_exploration.py --adapter runs/ifeval/sft --task ifeval --prompts 4 --tokens 32
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
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--task", default="ifeval")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    import torch
    import transformers

    from essa.chat import chat_prompts
    from essa.engine import PopulationEngine
    from essa.evaluate import resolve_system_prompt
    from essa.explore import DEFAULT_TARGET_KL, MovementProbe, calibrate_sigma, kl_and_agreement
    from essa.genome import load_genome
    from essa.models import load_model
    from essa.sampling import SamplingConfig
    from essa.tasks import get_task, split_rl_data

    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    _, train_rows = split_rl_data(task, None, 200, 0)
    rows = train_rows[:args.prompts]
    t0 = time.perf_counter()
    out = {"benchmark": "exploration", "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
           "device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
           "torch": torch.__version__, "transformers": transformers.__version__,
           "load_average_start": os.getloadavg(), "adapter": args.adapter, "task": args.task,
           "prompts": len(rows), "tokens": args.tokens, "candidates": args.candidates, "genomes": {}}
    for balance in (False, True):
        model, tok = load_model(args.model, device="cpu", dtype="float32")
        genome = load_genome(args.adapter, balance=balance)
        eng = PopulationEngine(model, tok, genome)
        ids = chat_prompts(tok, [r["prompt"] for r in rows], resolve_system_prompt(task, "task"))
        probe = MovementProbe(eng, ids, n_candidates=args.candidates, max_new_tokens=args.tokens, seed=args.seed)
        k = genome.k
        res = {"s_A_mean": float(genome.s_A[:, :k].mean()), "s_B_mean": float(genome.s_B[:, :k].mean()),
               "points": []}
        for sigma in args.sigmas:
            m = probe.measure(sigma)
            z = probe.z.reshape(args.candidates, -1, 2, k)
            halves = {}
            for name, j in (("A_only", 0), ("B_only", 1)):
                zz = np.zeros_like(z)
                zz[:, :, j] = z[:, :, j]
                lp, _ = eng.completion_logprobs(probe.prompt_ids, probe.completions, sigma * zz.reshape(args.candidates, -1))
                kl, _ = kl_and_agreement(probe.ref, lp, probe.mask, probe.tokens)
                halves[name] = float(np.mean(kl))
            gen = eng.generate(probe.prompt_ids, sigma * probe.z, SamplingConfig(max_new_tokens=args.tokens))
            differs = sum(any(gen[c][p][0].token_ids != probe.completions[p] for p in range(len(rows)))
                          for c in range(args.candidates))
            res["points"].append({"sigma": sigma, "kl": m.kl, "agreement": m.agreement, "kl_A_only": halves["A_only"],
                                  "kl_B_only": halves["B_only"], "greedy_differs": differs})
            print(json.dumps({"balance": balance, **res["points"][-1]}), file=sys.stderr)
        sig, log = calibrate_sigma(probe, DEFAULT_TARGET_KL)
        gen = eng.generate(probe.prompt_ids, sig * probe.z, SamplingConfig(max_new_tokens=args.tokens))
        differs = sum(any(gen[c][p][0].token_ids != probe.completions[p] for p in range(len(rows)))
                      for c in range(args.candidates))
        res["auto"] = {"target_kl": DEFAULT_TARGET_KL, "sigma0": sig, "greedy_differs": differs,
                       "measurements": len(log)}
        out["genomes"]["balanced" if balance else "unbalanced"] = res
        del eng, model
    out["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out["load_average_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
