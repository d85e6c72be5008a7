"""ESSA vs GRPO on the CPU learning study, fairly: `essa compare`, then paired intervals on held-out prompts.

1. `essa compare --config configs/compare-ifeval-cpu.yaml` (skipped when its comparison.json exists): the
   study's SFT adapter, training prompts, reward (fraction of IFEval instructions followed, loose),
   validation rows and held-out test prompts are the same for both arms; each arm trains for the same
   wall-clock budget, validates one model per validation at the same times (validation time counts in
   both budgets), and tests its best-by-validation and final adapters on the same held-out prompts.
2. Every test file is re-scored with IFEval's checkers and each adapter is compared with the SFT start
   on the same prompts: paired bootstrap (prompts resampled, 10,000 draws), 95 % interval, for the
   four IFEval metrics (as ``study_ifeval.py`` does).

Prints one JSON object (command, device, load average, per arm: iterations, wall-clock, generated
tokens, validation, test metrics with intervals). ``comparison_reused`` says whether the compare ran in
this invocation; the load averages are this script's (the compare records none of its own)::

    python benchmarks/compare_ifeval.py --out runs/compare-ifeval --budget-minutes 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_ifeval import counts, paired_bootstrap  # noqa: E402  (benchmarks/ is not a package)

ROOT = Path(__file__).resolve().parent.parent


def scored(path: Path, rows_by_prompt: dict) -> dict[str, np.ndarray]:
    """Per-prompt IFEval counts of a test file (``prompt``, ``completion`` per line)."""
    from essa.tasks.ifeval import ifeval_evaluate

    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return counts(ifeval_evaluate([rows_by_prompt[r["prompt"]] for r in recs], [r["completion"] for r in recs])["results"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/compare-ifeval-cpu.yaml")
    ap.add_argument("--out", default="runs/compare-ifeval")
    ap.add_argument("--budget-minutes", type=float, default=10)
    args = ap.parse_args(argv)

    from essa.config import load_yaml

    out = Path(args.out)
    cmd = [sys.executable, "-m", "essa.cli", "compare", "--config", args.config, "--budget-minutes",
           str(args.budget_minutes), "--set", f"output_dir={out}"]
    load_start = os.getloadavg()
    reused = (out / "comparison.json").exists()
    if not reused:
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=sys.stderr)
    comparison = json.loads((out / "comparison.json").read_text())
    cfg = load_yaml(ROOT / args.config)
    rows = {r["prompt"]: r for r in map(json.loads, (ROOT / cfg["test_data"]).read_text().splitlines())}
    result = {"benchmark": Path(args.config).stem, "command": " ".join(cmd), "comparison_reused": reused,
              "device": comparison["device"],
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "load_average_start": load_start, "budget_minutes": comparison["budget_minutes"],
              "validation": comparison["validation"], "test_prompts": comparison.get("test_limit"), "arms": {}}
    for arm in comparison["order"]:
        m = comparison["methods"][arm]
        run = out / arm
        sft = scored(run / "test-sft.jsonl", rows)
        tests = {which: paired_bootstrap(sft, scored(run / f"test-{which}.jsonl", rows))
                 for which in ("best", "final") if (run / f"test-{which}.jsonl").exists()}
        result["arms"][arm] = {k: m.get(k) for k in ("iterations", "iteration_unit", "training_wall_seconds",
                                                       "tokens_generated", "validations", "best_val",
                                                       "best_val_wall_seconds", "final_val", "peak_memory_gb")}
        result["arms"][arm]["test_vs_sft"] = tests
    result["load_average_end"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
