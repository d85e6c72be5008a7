"""The demo's ESSA run with one search axis changed: α, population × mini-batch, SFT start or training instructions (issue 11).

The learning issue's search lists "rank and α" and "population and batch" among the axes to try before
calling the bar out of reach. This probe runs the demo's ESSA configuration (``essa.demo.demo_config``:
the shipped SFT adapter, the answer-format task, population 8, mini-batch 16, 10 generations, 32 new
tokens) with `essa train --set` overrides, and scores each best-by-validation adapter like
``study_demo_transfer.py``: the demo's held-out questions (the run's own test report), all 541 IFEval
prompts and the learning study's held-out generated prompts (greedy, 256 new tokens), ESSA − SFT with
paired bootstrap intervals (10,000 draws, 95 %).

    python benchmarks/probe_demo_axes.py --out runs/axes --set alpha=0.125 --seeds 0 1
    python benchmarks/probe_demo_axes.py --out runs/axes --set popsize=16 --set batch_size=8 --seeds 0
    python benchmarks/probe_demo_axes.py --out runs/axes --adapter runs/rank/sft-r16 --seeds 0 1
    python benchmarks/probe_demo_axes.py --out runs/axes --instructions detectable_format:constrained_response \
        change_case:english_capital --set generation.max_new_tokens=48 --seeds 0 1

``--instructions TYPE ...`` trains on a mix of instructions instead of the demo's one: the learning study's
training prompts (the task's generated ``rl`` rows less its 200 held-out ones, `study_ifeval.study_split`) that
carry exactly one instruction of these types, less any yes-no question of the demo's held-out topics (the run's
own test report stays the demo's held-out questions); written to ``OUT/<variant>/train.jsonl`` and passed as
``--set train_data=...``.

``--adapter DIR`` starts from another SFT adapter (e.g. the demo recipe at another LoRA rank): it is scored as
the SFT baseline in ``OUT/sft-<folder name>``, against the shipped adapter (``sft_vs_shipped_sft``, whose eval
files in ``OUT/sft`` are reused or made), and passed to `essa train` as ``--set adapter=DIR``.

Each combination of overrides gets its own folder (``OUT/alpha=0.125/s0``); the SFT adapter's eval files
go to ``OUT/sft`` (or ``--sft-evals``, e.g. the study's). Outputs that exist are reused (listed under
``reused``). Prints one JSON object.
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
from study_ifeval import demo_seed_record, eval_ifeval, paired_bootstrap, run, study_heldout, study_split, yes_no_question  # noqa: E402  (benchmarks/ is not a package)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/axes")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="`essa train --set` override of the demo's configuration (repeatable)")
    ap.add_argument("--adapter", default=None,
                    help="SFT start other than the demo's shipped adapter (scored as the SFT baseline, given to essa train)")
    ap.add_argument("--instructions", nargs="+", default=None, metavar="TYPE",
                    help="train on the study's generated training prompts with exactly one of these instructions")
    ap.add_argument("--sft-evals", default=None,
                    help="folder of the SFT adapter's eval files (default OUT/sft, or OUT/sft-<name> with --adapter)")
    args = ap.parse_args(argv)

    from essa.config import to_dict
    from essa.demo import demo_adapter, demo_config
    from essa.files import write_json
    from essa.tasks.ifeval_data import make_answer_format, write_jsonl

    out = Path(args.out).resolve()
    adapter = Path(args.adapter).resolve() if args.adapter else demo_adapter()
    if args.adapter and not (adapter / "adapter_config.json").is_file():
        ap.error(f"--adapter {args.adapter}: no adapter_config.json there; give the folder `essa sft --output-dir` wrote")
    train_rows, demo_heldout = make_answer_format()
    mix_rows = None
    if args.instructions:  # checked before anything is run or written
        mix_rows = instruction_mix(args.instructions, demo_heldout)
        missing = sorted(set(args.instructions) - {r["instruction_id_list"][0] for r in mix_rows})
        if missing:
            ap.error(f"--instructions: no training prompt has the instruction {missing[0]!r}; "
                     "give instruction ids of the ifeval task (e.g. detectable_format:title)")
    mix = [f"instructions={'+'.join(t.split(':')[-1] for t in args.instructions)}"] if args.instructions else []
    variant = ",".join(mix + args.set + ([f"adapter={adapter.name}"] if args.adapter else [])).replace("/", "_") or "demo"
    mix_path = out / variant / "train.jsonl"
    if mix_rows is not None and mix_path.exists() and [
            json.loads(x) for x in mix_path.read_text().splitlines() if x.strip()] != mix_rows:
        ap.error(f"{mix_path} holds other training rows than these instructions select (an earlier run's); "
                 "give another --out, or remove that run's folder")
    overrides = args.set + ([f"adapter={adapter}"] if args.adapter else [])
    sft_dir = (Path(args.sft_evals).resolve() if args.sft_evals
               else out / ("sft" if not args.adapter else f"sft-{adapter.name}"))
    sft_dir.mkdir(parents=True, exist_ok=True)
    essa = [sys.executable, "-m", "essa.cli"]
    commands, reused = [], []
    result = {"study": "demo-axes", "command": shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
              "device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "load_average_start": os.getloadavg(), "seeds": args.seeds, "overrides": overrides,
              "sft_adapter": str(adapter)}
    t0 = time.perf_counter()

    # the demo's data and configuration (the same rows and settings as `essa demo`)
    train_path, demo_heldout_path = out / "demo-train.jsonl", out / "demo-heldout.jsonl"
    for rows, path in ((train_rows, train_path), (demo_heldout, demo_heldout_path)):
        if not path.exists():   # written once: a second run reuses them (and the runs that read them)
            write_jsonl(rows, path)
    config_path = out / "demo-config.json"
    if not config_path.exists():
        write_json(config_path, to_dict(demo_config(train_path, demo_heldout_path, out / "unused")))

    heldout_path, clean = study_heldout(sft_dir)

    def evaluate(adapter: Path, folder: Path, name: str) -> dict:
        return eval_ifeval(adapter, folder, name, heldout_path, clean, commands, reused)

    sft = evaluate(adapter, sft_dir, "sft")
    (out / variant).mkdir(parents=True, exist_ok=True)
    if args.instructions:
        if not mix_path.exists():
            write_jsonl(mix_rows, mix_path)
        result.update(instructions=args.instructions, train_rows=len(mix_rows))
        overrides.append(f"train_data={mix_path}")   # result["overrides"] is this list: it records what essa train got
    result["per_seed"] = {}
    for seed in args.seeds:
        run_dir = out / variant / f"s{seed}"
        summary_path = run_dir / "summary.json"
        if summary_path.exists():
            reused.append(str(summary_path))
        else:
            run(essa + ["train", "--config", str(config_path), "--set", f"output_dir={run_dir}", "--set", f"seed={seed}"]
                + [x for s in overrides for x in ("--set", s)], out / variant / f"s{seed}.log", commands)
        summary = json.loads(summary_path.read_text())
        essa_res = evaluate(Path(summary["adapters"]["best"]), run_dir, "essa")
        result["per_seed"][str(seed)] = demo_seed_record(summary, sft, essa_res)
    if args.adapter:  # the other SFT start against the shipped one (its eval files in OUT/sft: reused or made)
        shipped = evaluate(demo_adapter(), out / "sft", "sft")
        result["sft_vs_shipped_sft"] = {split: paired_bootstrap(shipped[split], sft[split]) for split in ("ifeval", "heldout")}
    result.update(heldout_rows=len(clean), commands=commands, reused=reused,
                  wall_seconds=round(time.perf_counter() - t0, 1), load_average_end=os.getloadavg())
    text = json.dumps(result, indent=2)
    (out / variant / "probe.json").write_text(text)
    print(text)


def instruction_mix(types: list[str], demo_heldout: list[dict]) -> list[dict]:
    """The learning study's generated training prompts (not its held-out ones) with exactly one instruction,
    of one of ``types``, leaving out the yes-no questions of the demo's held-out topics."""
    from essa.tasks import get_task, load_rows

    held = {r["key"] for r in study_split()[0]}
    demo = {yes_no_question(r) for r in demo_heldout}
    return [r for r in load_rows(get_task("ifeval"), "rl")   # in the split's file order
            if r["key"] not in held and len(r["instruction_id_list"]) == 1 and r["instruction_id_list"][0] in types
            and yes_no_question(r) not in demo]


if __name__ == "__main__":
    main()
