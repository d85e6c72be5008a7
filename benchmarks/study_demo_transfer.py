"""Does the demo's ESSA adapter follow instructions better in general? (issue 11: the learning bar)

`essa demo` trains ESSA for ~10 generations on one instruction (the constrained-response answer format on
yes-no questions, ``essa.tasks.ifeval_data.make_answer_format``), starting from the shipped SFT adapter (the
README's IFEval SFT recipe). This study scores the resulting best-by-validation adapters on data the demo
never saw, against that SFT start:

1. For every seed: `essa demo --out OUT/demo-s{seed} --seed {seed}` (skipped when its summary exists).
2. `essa eval` (greedy, 256 new tokens) of the SFT adapter and of every seed's adapter on all 541 IFEval
   prompts and on the learning study's held-out generated prompts (``study_ifeval.py``: 200 rows of the
   task's ``rl`` split, seeded 2026; never used for SFT, ESSA training or validation). Held-out rows whose
   yes-no question is one of the demo's training questions are left out of the scores (``overlap_removed``).
3. Paired bootstrap (prompts resampled, 10,000 draws) of ESSA − SFT, 95 % interval, for the four IFEval
   metrics (``study_ifeval.paired_bootstrap``).

Evaluations whose files exist are reused (listed under ``reused``). Prints one JSON object.

    python benchmarks/study_demo_transfer.py --out runs --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_ifeval import demo_seed_record, eval_ifeval, run, study_heldout  # noqa: E402  (benchmarks/ is not a package)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs", help="demo-s{seed}/ and sft-evals go here")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--sft-evals", default="runs/study", help="folder of the SFT adapter's eval files (study_ifeval.py's)")
    args = ap.parse_args(argv)

    from essa.demo import demo_adapter

    out, sft_dir = Path(args.out).resolve(), Path(args.sft_evals).resolve()
    sft_dir.mkdir(parents=True, exist_ok=True)
    essa = [sys.executable, "-m", "essa.cli"]
    commands, reused = [], []
    result = {"study": "demo-transfer", "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "load_average_start": os.getloadavg(), "seeds": args.seeds, "sft_adapter": str(demo_adapter())}
    t0 = time.perf_counter()

    heldout_path, clean = study_heldout(sft_dir)   # the learning study's 200 held-out rows
    result["heldout_rows"], result["overlap_removed"] = len(clean), 200 - len(clean)

    def evaluate(adapter: Path, folder: Path, name: str) -> dict:
        return eval_ifeval(adapter, folder, name, heldout_path, clean, commands, reused)

    sft = evaluate(demo_adapter(), sft_dir, "sft")
    result["per_seed"] = {}
    for seed in args.seeds:
        run_dir = out / f"demo-s{seed}"
        summary_path = run_dir / "essa" / "summary.json"
        if summary_path.exists():
            reused.append(str(summary_path))
        else:
            run(essa + ["demo", "--out", str(run_dir), "--seed", str(seed)], out / f"demo-s{seed}.log", commands)
        summary = json.loads(summary_path.read_text())
        essa_res = evaluate(Path(summary["adapters"]["best"]), run_dir, "essa")
        result["per_seed"][str(seed)] = demo_seed_record(summary, sft, essa_res)
    result.update(commands=commands, reused=reused, wall_seconds=round(time.perf_counter() - t0, 1),
                  load_average_end=os.getloadavg())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
