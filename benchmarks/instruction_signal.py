"""Which IFEval instructions separate ESSA candidates? (issue 11: fitness with signal, per instruction type)

K candidates (candidate 0 = the SFT adapter itself, the others offsets ~ N(0, sigma^2 I)) answer PER
single-instruction training prompts of each named instruction type (greedy). Per type: the SFT adapter's
pass rate, each candidate's pass rate, and the intra-class correlation of the candidates' pass rates
between the two halves of the prompts (`fitness_signal.icc`: how much of the fitness variance belongs to
the candidate rather than to the prompts). A type whose candidates differ consistently is one ESSA can
learn from at a small population and mini-batch. Prints one JSON object.

    python benchmarks/instruction_signal.py --adapter runs/ifeval/sft --data runs/study/train.jsonl \\
        --sigma 0.5 --per-type 16 --candidates 9 --max-new-tokens 48 \\
        --types startend:quotation detectable_format:constrained_response detectable_format:title combination:repeat_prompt
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fitness_signal import icc  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--data", required=True, help="IFEval-style training rows (.jsonl)")
    ap.add_argument("--types", nargs="+", required=True, help="instruction ids; rows with exactly that one instruction")
    ap.add_argument("--sigma", type=float, required=True)
    ap.add_argument("--per-type", type=int, default=16)
    ap.add_argument("--candidates", type=int, default=9, help="including the SFT adapter (candidate 0)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from essa.chat import chat_prompts
    from essa.engine import EngineConfig
    from essa.engines import build_engine
    from essa.rewards import score_completions
    from essa.sampling import SamplingConfig
    from essa.tasks import get_task, load_rows

    task = get_task("ifeval")
    rows = load_rows(task, args.data)
    rng = np.random.default_rng(args.seed)
    sel = []
    for t in args.types:
        of_type = [r for r in rows if r["instruction_id_list"] == [t]]
        if len(of_type) < args.per_type:
            sys.exit(f"instruction_signal: only {len(of_type)} rows of {t} in {args.data}; lower --per-type")
        sel += [of_type[i] for i in rng.choice(len(of_type), args.per_type, replace=False)]
    engine = build_engine(args.model, args.adapter, EngineConfig(device="cpu"))
    X = rng.normal(0.0, args.sigma, size=(args.candidates, engine.genome.dimension))
    X[0] = 0.0
    ids = chat_prompts(engine.tokenizer, [r["prompt"] for r in sel], task.system_prompt)
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    out = engine.generate(ids, X, SamplingConfig(max_new_tokens=args.max_new_tokens))
    seconds = time.perf_counter() - t0
    S = np.zeros((args.candidates, len(sel)))
    words = np.zeros_like(S)
    for k in range(args.candidates):
        texts = [out[k][p][0].text for p in range(len(sel))]
        S[k], _, _ = score_completions(task.reward, sel, texts)
        words[k] = [len(t.split()) for t in texts]
    per_type = {}
    half = args.per_type // 2
    for j, t in enumerate(args.types):
        s = S[:, j * args.per_type:(j + 1) * args.per_type]
        halves = np.stack([s[1:, :half].mean(1), s[1:, half:].mean(1)])
        rho = icc(halves)["icc"]  # undefined (None) when the candidates do not differ at all
        per_type[t] = {"sft_pass_rate": round(float(s[0].mean()), 4),
                       "candidate_pass_rates": s[1:].mean(1).round(4).tolist(),
                       "icc_between_halves": round(rho, 3) if np.isfinite(rho) else None,
                       "mean_words_sft": round(float(words[0, j * args.per_type:(j + 1) * args.per_type].mean()), 1)}
    print(json.dumps({"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), "device": "cpu",
                      "python": platform.python_version(), "load_average_start": load0,
                      "load_average_end": os.getloadavg(), "generate_seconds": round(seconds, 1),
                      "sigma": args.sigma, "candidates": args.candidates, "per_type": args.per_type,
                      "max_new_tokens": args.max_new_tokens, "types": per_type}))


if __name__ == "__main__":
    main()
