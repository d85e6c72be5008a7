"""Does a stronger SFT change what ESSA adds? (issue 11: the "SFT strength" axis of the search)

The demo and the transfer study start from the shipped SFT adapter (the README's IFEval SFT recipe: 40 kept
examples, 3 epochs at lr 3e-4, loss 1.30 → 1.27). This probe trains a stronger SFT on the same 40 examples
(6 epochs at lr 1e-3), runs the demo's ESSA configuration from it (the demo seed's own ``config.json`` with
only the adapter and output folder changed), and scores both adapters like ``study_demo_transfer.py``: the
demo's held-out questions (from the ESSA run's test report), all 541 IFEval prompts and the study's held-out
generated prompts (greedy, 256 new tokens), ESSA − SFT with paired bootstrap intervals (and the stronger SFT
against the shipped one, ``strong_minus_shipped_sft``, labelled sft → essa there). Outputs that exist are
reused (listed under ``reused``). Prints one JSON object.

    python benchmarks/probe_sft_strength.py --out runs/sft-strength --seeds 0
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
from study_ifeval import clean_heldout_keys, demo_seed_record, eval_ifeval, paired_bootstrap, run  # noqa: E402  (benchmarks/ is not a package)

SFT = ["--task", "ifeval", "--epochs", "6", "--batch-size", "4", "--grad-accum", "2", "--max-length", "512",
       "--lr", "1e-3", "--warmup-ratio", "0.0", "--device", "cpu"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/sft-strength")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--sft-data", default="runs/ifeval/ifeval-sft.jsonl", help="the README recipe's step-1 output")
    ap.add_argument("--demo-runs", default="runs", help="folder of the transfer study's demo-s{seed}/ runs")
    ap.add_argument("--heldout", default="runs/study/heldout.jsonl", help="the study's held-out generated prompts")
    ap.add_argument("--sft-evals", default="runs/study", help="the shipped SFT adapter's eval files (study_ifeval.py's)")
    args = ap.parse_args(argv)

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    essa = [sys.executable, "-m", "essa.cli"]
    commands, reused = [], []
    result = {"study": "sft-strength", "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "load_average_start": os.getloadavg(), "seeds": args.seeds, "sft_recipe": shlex.join(SFT)}
    t0 = time.perf_counter()

    def step(cmd: list[str], done: Path, log: Path):
        if done.exists():
            reused.append(str(done))
        else:
            run(cmd, log, commands)

    sft = out / "sft"
    step(essa + ["sft", "--data", args.sft_data, "--output-dir", str(sft)] + SFT, sft / "adapter_config.json",
         out / "sft.log")
    clean = clean_heldout_keys([json.loads(x) for x in Path(args.heldout).read_text().splitlines() if x.strip()])

    def evaluate(adapter: Path, name: str, folder: Path = out) -> dict:
        return eval_ifeval(adapter, folder, name, Path(args.heldout), clean, commands, reused)

    sft_res = evaluate(sft, "sft")
    if all((Path(args.sft_evals) / f"eval-{split}-sft.jsonl").exists() for split in ("ifeval", "heldout")):
        # the stronger SFT against the shipped one (its eval files: the study's, reused)
        shipped = evaluate(None, "sft", Path(args.sft_evals))
        result["strong_minus_shipped_sft"] = {split: paired_bootstrap(shipped[split], sft_res[split])
                                              for split in ("ifeval", "heldout")}
    result["per_seed"] = {}
    for seed in args.seeds:
        run_dir = out / f"s{seed}" / "essa"
        config = Path(args.demo_runs) / f"demo-s{seed}" / "essa" / "config.json"
        step(essa + ["train", "--config", str(config), "--set", f"adapter={sft}", "--set", f"output_dir={run_dir}",
                     "--set", f"seed={seed}"], run_dir / "summary.json", out / f"s{seed}.log")
        summary = json.loads((run_dir / "summary.json").read_text())
        essa_res = evaluate(Path(summary["adapters"]["best"]), f"s{seed}")
        result["per_seed"][str(seed)] = demo_seed_record(summary, sft_res, essa_res)
    result.update(heldout_rows=len(clean), commands=commands, reused=reused,
                  wall_seconds=round(time.perf_counter() - t0, 1), load_average_end=os.getloadavg())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
