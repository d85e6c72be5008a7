"""The learning study: does ESSA improve instruction following over its SFT start, on held-out data?

SmolLM2-135M-Instruct on a 2-core CPU, every step an `essa` command (printed and recorded):

1. SFT recipe (skipped when the adapter exists): IFEval-style SFT data by rejection sampling, then
   `essa sft` (README, "Results").
2. Held-out prompts: the task's generated `rl` prompts are split (seeded) into HELDOUT rows that no
   step ever trains or selects on, and the rest, which ESSA trains on (its validation rows are carved
   from that rest by `essa train` itself).
3. For every seed: `essa train --config configs/ifeval-study-cpu.yaml` for at most BUDGET minutes
   (selection by validation on training-data rows only, never on test).
4. `essa eval` of the SFT adapter and of every ESSA best adapter on all 541 IFEval prompts and on the
   held-out generated prompts (greedy, 256 new tokens).
5. Paired bootstrap (prompts resampled, 10,000 draws) of ESSA − SFT for instruction-level loose and
   strict accuracy and prompt-level loose/strict: mean difference and 95 % interval.

Steps whose outputs exist are reused, so an interrupted study continues. Prints one JSON object.

    python benchmarks/study_ifeval.py --out runs/study --seeds 0 1 --budget-minutes 30
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("inst_loose", "inst_strict", "prompt_loose", "prompt_strict")


def run(cmd: list[str], log: Path, record: list) -> float:
    """Run one essa command (output to a log file), record it with its wall time."""
    print("$ " + shlex.join(cmd), file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    log.parent.mkdir(parents=True, exist_ok=True)  # the command's outputs go next to its log
    with open(log, "w") as f:
        subprocess.run(cmd, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t0
    record.append({"command": shlex.join(cmd), "wall_seconds": round(wall, 1), "log": str(log)})
    return wall


def counts(rows: list[dict]) -> dict[str, np.ndarray]:
    """Per-prompt counts from IFEval results (``strict_list``, ``loose_list``, ``strict_all``, ``loose_all``)."""
    return {"strict_n": np.array([sum(r["strict_list"]) for r in rows], float),
            "loose_n": np.array([sum(r["loose_list"]) for r in rows], float),
            "inst": np.array([len(r["strict_list"]) for r in rows], float),
            "strict_all": np.array([r["strict_all"] for r in rows], float),
            "loose_all": np.array([r["loose_all"] for r in rows], float)}


def metric(d: dict | list[dict], name: str, idx=slice(None)) -> float:
    """A metric of `counts` on the prompts ``idx``; of a list of counts (several runs on the same prompts), their mean."""
    if isinstance(d, list):
        return sum(metric(x, name, idx) for x in d) / len(d)
    if name == "inst_loose":
        return d["loose_n"][idx].sum() / d["inst"][idx].sum()
    if name == "inst_strict":
        return d["strict_n"][idx].sum() / d["inst"][idx].sum()
    return d[name.replace("prompt_", "") + "_all"][idx].mean()


def clean_heldout_keys(heldout: list[dict]) -> set[str]:
    """Keys of the held-out generated prompts that the demo task does not train on (the demo's yes/no
    questions also appear, with other instructions, among the generated prompts: those are dropped)."""
    from essa.tasks.ifeval_data import make_answer_format

    demo = {yes_no_question(r) for r in make_answer_format()[0]}
    return {r["key"] for r in heldout if yes_no_question(r) not in demo}


def yes_no_question(row: dict) -> str | None:
    """The yes-no question a row asks (its prompt up to the "?"), None for rows of other sources: the demo's
    questions come back among the generated prompts with other instructions."""
    return row["prompt"].split("?")[0] if row["source"] == "yes_no" else None


def study_split(n: int = 200) -> tuple[list[dict], list[dict]]:
    """The task's generated ``rl`` prompts split (seeded 2026) into ``n`` held-out rows, never trained or selected
    on, and the training rest: ``(heldout, train)``."""
    from essa.tasks import get_task, load_rows, seeded_split

    rl = load_rows(get_task("ifeval"), "rl")
    heldout, train = seeded_split(rl, [n, len(rl) - n], 2026)
    return heldout, train


def study_heldout(folder: Path, n: int = 200) -> tuple[Path, set[str]]:
    """The learning study's held-out generated prompts (``n`` rows of the task's ``rl`` split, seeded 2026;
    never used for SFT, training or validation), written to ``folder/heldout.jsonl`` when it is missing, and
    the keys scored on them (`clean_heldout_keys`)."""
    from essa.tasks.ifeval_data import write_jsonl

    heldout = study_split(n)[0]
    path = folder / "heldout.jsonl"
    if not path.exists():
        write_jsonl(heldout, path)
    return path, clean_heldout_keys(heldout)


def demo_seed_record(summary: dict, sft: dict, essa: dict) -> dict:
    """One seed of a demo-style ESSA run (its `summary.json`) scored against the SFT start: the demo's
    held-out questions (the run's own test report) and ESSA − SFT on IFEval and the held-out generated
    prompts (``sft``/``essa``: `eval_ifeval` results)."""
    return {"demo_heldout": {"sft": summary["test_sft"], "essa": summary["test_best"],
                             "diff_ci95": summary.get("test_best_minus_sft")},
            "essa_wall_seconds": summary["wall_seconds"], "generations": summary["generations"],
            "tokens_generated": summary.get("tokens_generated"), "genome_dimension": summary.get("genome_dimension"),
            "best_val": summary["best_val"],
            "best_val_generation": summary["best_val_generation"],
            **{split: paired_bootstrap(sft[split], essa[split]) for split in ("ifeval", "heldout")}}


def eval_counts(adapter: Path, path: Path, data: Path | None, tokens: int, commands: list, reused: list,
                keep: set[str] | None = None) -> dict:
    """`essa eval --task ifeval` of an adapter on ``data`` (None: all 541 IFEval prompts), greedy, ``tokens`` new
    tokens, into ``path`` (its log beside it; reused when it exists, and listed in ``reused``) → the per-prompt
    `counts` of the rows whose key is in ``keep`` (None: all)."""
    if path.exists():
        reused.append(str(path))
    else:
        run([sys.executable, "-m", "essa.cli", "eval", "--task", "ifeval", "--adapter", str(adapter),
             "--max-new-tokens", str(tokens), "--device", "cpu", "--output", str(path)]
            + ([] if data is None else ["--data", str(data)]), path.with_suffix(".log"), commands)
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return counts([r for r in rows if keep is None or r["key"] in keep])


def eval_ifeval(adapter: Path, folder: Path, name: str, heldout: Path, keep: set[str] | None, commands: list,
                reused: list, tokens: int = 256) -> dict:
    """`eval_counts` of an adapter on all 541 IFEval prompts and on the held-out generated prompts ``heldout``
    (the rows whose key is in ``keep``; None: all) → {"ifeval": counts, "heldout": counts}; the eval files are
    ``folder/eval-{split}-{name}.jsonl``."""
    return {"ifeval": eval_counts(adapter, folder / f"eval-ifeval-{name}.jsonl", None, tokens, commands, reused),
            "heldout": eval_counts(adapter, folder / f"eval-heldout-{name}.jsonl", heldout, tokens, commands, reused, keep)}


def paired_bootstrap(a: dict, b: dict | list[dict], draws: int = 10_000, seed: int = 0) -> dict:
    """b − a for every metric: point estimate and 95 % percentile interval, prompts resampled in pairs
    (``essa.evaluate.paired_bootstrap`` with each metric as the statistic). ``b`` a list: several runs' counts on
    a's prompts, pooled (their mean − a, the prompts resampled jointly)."""
    from essa.evaluate import paired_bootstrap as bootstrap

    out = {}
    for m in METRICS:
        res = bootstrap(a, b, draws, seed, statistic=lambda d, idx, m=m: metric(d, m, idx))
        out[m] = {"sft": round(metric(a, m), 4), "essa": round(metric(b, m), 4), "diff": res["diff"],
                  "ci95": res["ci95"], "significant": res["significant"]}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/study")
    ap.add_argument("--sft-adapter", default="runs/ifeval/sft")
    ap.add_argument("--config", default="configs/ifeval-study-cpu.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--budget-minutes", type=float, default=30)
    ap.add_argument("--heldout", type=int, default=200)
    ap.add_argument("--eval-tokens", type=int, default=256)
    ap.add_argument("--set", action="append", default=[], help="extra `essa train --set` overrides")
    args = ap.parse_args(argv)

    from essa.tasks.ifeval_data import write_jsonl

    out = Path(args.out).resolve()   # commands run from the repository root: absolute paths throughout
    out.mkdir(parents=True, exist_ok=True)
    essa = [sys.executable, "-m", "essa.cli"]
    commands: list = []
    t0 = time.perf_counter()
    result = {"study": "ifeval-essa-vs-sft", "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "load_average_start": os.getloadavg(), "seeds": args.seeds, "budget_minutes": args.budget_minutes}
    sft = Path(args.sft_adapter).resolve()
    if not (sft / "adapter_config.json").exists():
        data = out / "ifeval-sft.jsonl"
        if not data.exists():
            run(essa + ["data", "ifeval-like", "--n", "128", "--seed", "0", "--out", str(data), "--responses",
                        "--samples", "4", "--max-new-tokens", "256"], out / "sft-data.log", commands)
        run(essa + ["sft", "--task", "ifeval", "--data", str(data), "--output-dir", str(sft), "--epochs", "3",
                    "--batch-size", "4", "--grad-accum", "2", "--max-length", "512", "--lr", "3e-4",
                    "--warmup-ratio", "0.0", "--device", "cpu"], out / "sft.log", commands)

    # held-out generated prompts: never trained on, never selected on
    heldout, train = study_split(args.heldout)
    if not (out / "train.jsonl").exists():
        write_jsonl(heldout, out / "heldout.jsonl")
        write_jsonl(train, out / "train.jsonl")

    def evaluate(adapter: Path, name: str) -> dict:
        return eval_ifeval(adapter, out, name, out / "heldout.jsonl", None, commands, [], args.eval_tokens)

    base = evaluate(sft, "sft")  # first: the reference every seed is compared with
    result.update({"sft_adapter": str(sft), "heldout_prompts": args.heldout,
                   "ifeval_prompts": len(base["ifeval"]["inst"]), "commands": commands})
    seeds = {}
    for seed in args.seeds:
        run_dir = out / f"essa-s{seed}"
        if not (run_dir / "summary.json").exists() and (run_dir / "checkpoint.npz").exists():
            # an interrupted run of this study continues from its checkpoint (nothing is deleted)
            run(essa + ["train", "--resume", str(run_dir)], out / f"train-s{seed}-resume.log", commands)
        elif not (run_dir / "summary.json").exists():
            run(essa + ["train", "--config", str(Path(args.config).resolve()), "--set", f"adapter={sft}", "--set",
                        f"train_data={out / 'train.jsonl'}", "--set", f"seed={seed}", "--set", f"output_dir={run_dir}",
                        "--set", f"max_minutes={args.budget_minutes}"] + [x for s in args.set for x in ("--set", s)],
                out / f"train-s{seed}.log", commands)
        summary = json.loads((run_dir / "summary.json").read_text())
        metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        cal = json.loads((run_dir / "calibration.json").read_text()) if (run_dir / "calibration.json").exists() else {}
        seeds[seed] = {"run": summary, "sigma0": cal.get("sigma0"), "calibration_kl": cal.get("kl"),
                       "flat_generations": sum(bool(m.get("flat_fitness")) for m in metrics),
                       "validation": [(m["generation"], m["val_mean"]) for m in metrics if "val_mean" in m],
                       "fitness": [(m["generation"], round(m["fitness_mean"], 4), round(m["fitness_std"], 4))
                                   for m in metrics if "fitness_mean" in m]}
        best = evaluate(run_dir / "adapters" / "best", f"essa-s{seed}")
        seeds[seed]["ifeval"] = paired_bootstrap(base["ifeval"], best["ifeval"], seed=seed)
        seeds[seed]["heldout"] = paired_bootstrap(base["heldout"], best["heldout"], seed=seed)
        result.update({"per_seed": seeds, "wall_seconds": round(time.perf_counter() - t0, 1),
                       "load_average_end": os.getloadavg()})
        (out / "study.json").write_text(json.dumps(result, indent=2))  # partial results after every seed
    text = json.dumps(result, indent=2)
    (out / "study.json").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
