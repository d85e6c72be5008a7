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
from study_ifeval import counts, paired_bootstrap, run  # noqa: E402  (benchmarks/ is not a package)

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

    from essa.tasks.ifeval_data import make_answer_format

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
    demo_questions = {r["prompt"].split("?")[0] for r in make_answer_format()[0]}
    heldout = [json.loads(x) for x in Path(args.heldout).read_text().splitlines() if x.strip()]
    clean = {r["key"] for r in heldout if not (r["source"] == "yes_no" and r["prompt"].split("?")[0] in demo_questions)}

    def evaluate(adapter: Path, name: str) -> dict:
        res = {}
        for split, data in (("ifeval", None), ("heldout", args.heldout)):
            path = out / f"eval-{split}-{name}.jsonl"
            cmd = essa + ["eval", "--task", "ifeval", "--adapter", str(adapter), "--max-new-tokens", "256",
                          "--device", "cpu", "--output", str(path)] + ([] if data is None else ["--data", str(data)])
            step(cmd, path, out / f"eval-{split}-{name}.log")
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            res[split] = counts([r for r in rows if split == "ifeval" or r["key"] in clean])
        return res

    sft_res = evaluate(sft, "sft")
    shipped = {split: Path(args.sft_evals) / f"eval-{split}-sft.jsonl" for split in ("ifeval", "heldout")}
    if all(p.exists() for p in shipped.values()):  # the stronger SFT against the shipped one (its evals: the study's)
        reused.extend(str(p) for p in shipped.values())
        result["strong_minus_shipped_sft"] = {split: paired_bootstrap(counts(
            [r for r in map(json.loads, p.read_text().splitlines()) if split == "ifeval" or r["key"] in clean]), sft_res[split])
            for split, p in shipped.items()}
    result["per_seed"] = {}
    for seed in args.seeds:
        run_dir = out / f"s{seed}" / "essa"
        config = Path(args.demo_runs) / f"demo-s{seed}" / "essa" / "config.json"
        step(essa + ["train", "--config", str(config), "--set", f"adapter={sft}", "--set", f"output_dir={run_dir}",
                     "--set", f"seed={seed}"], run_dir / "summary.json", out / f"s{seed}.log")
        summary = json.loads((run_dir / "summary.json").read_text())
        essa_res = evaluate(Path(summary["adapters"]["best"]), f"s{seed}")
        result["per_seed"][str(seed)] = {
            "demo_heldout": {"sft": summary["test_sft"], "essa": summary["test_best"],
                             "diff_ci95": summary.get("test_best_minus_sft")},
            "essa_wall_seconds": summary["wall_seconds"], "generations": summary["generations"],
            "best_val": summary["best_val"], "best_val_generation": summary["best_val_generation"],
            **{split: paired_bootstrap(sft_res[split], essa_res[split]) for split in ("ifeval", "heldout")}}
    result.update(heldout_rows=len(clean), commands=commands, reused=reused,
                  wall_seconds=round(time.perf_counter() - t0, 1), load_average_end=os.getloadavg())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
