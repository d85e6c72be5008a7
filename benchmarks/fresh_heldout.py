"""Issue 11: ESSA runs of one configuration scored on more held-out generated prompts, each run and all pooled.

The learning study's 183 held-out generated prompts resolve about ±4 points per run (README). This scores an SFT
start and several ESSA runs made from it on ``--rows`` further generated IFEval-style prompts that nothing in the
demo-style runs has seen: rows 128 and on of the ifeval task's ``sft`` split (the shipped SFT adapter's data came
from rows 0–127; the ``rl`` split, which other probes trained and selected on, is not used), less the yes-no rows
whose question is a demo training question (`clean_heldout_keys`), the first ``--rows`` kept — fixed before
anything is scored. ``--set study`` scores the study's 183 prompts instead, ``--set ifeval`` all 541 IFEval prompts (the
runs' eval files from the demo-axes probe are reused).

Per run: ESSA − SFT (paired bootstrap over prompts, 10,000 draws, 95 %); pooled: the mean of the runs against
the SFT start, prompts resampled jointly — the configuration's effect, with the runs' own scatter averaged.
`essa eval --task ifeval` greedy, 256 new tokens; eval files are reused when they exist: the SFT's in ``--out``,
each run's in its folder (``eval-{set}-essa.jsonl``). Prints one JSON object and writes it to ``--out``.

    ESSA_FAST_ATTENTION=sdpa ESSA_FAST_LORA_CONCAT=0 python benchmarks/fresh_heldout.py --out runs/fresh \
        --runs runs/axes/generations=30,batch_size=32/s{0,1,2,3}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_ifeval import ROOT, clean_heldout_keys, eval_counts, paired_bootstrap, study_heldout  # noqa: E402

SFT_ROWS_USED = 128     # `essa data ifeval-like --n 128 --seed 0` made the shipped SFT adapter's data (README, recipe step 1)


def fresh_rows(n: int) -> list[dict]:
    """The first ``n`` generated prompts of the task's ``sft`` split after the rows the SFT data came from, less the
    yes-no rows whose question the demo trains on."""
    from essa.tasks import get_task, load_rows

    rows = load_rows(get_task("ifeval"), "sft")[SFT_ROWS_USED:]
    keep = clean_heldout_keys(rows)
    rows = [r for r in rows if r["key"] in keep]
    return rows[:n]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the prompts, the SFT's eval file and the JSON")
    ap.add_argument("--runs", nargs="+", required=True, help="finished ESSA run folders (adapters/best) of one SFT start")
    ap.add_argument("--sft-adapter", default=str(ROOT / "src/essa/data/demo/sft-adapter"))
    ap.add_argument("--set", choices=("fresh", "study", "ifeval"), default="fresh")
    ap.add_argument("--rows", type=int, default=600, help="fresh prompts (--set fresh)")
    args = ap.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    for r in runs:
        if not (r / "adapters" / "best").is_dir():
            ap.exit(2, f"fresh_heldout: {r} has no adapters/best; give finished `essa train` run folders\n")
    if not Path(args.sft_adapter).is_dir():
        ap.exit(2, f"fresh_heldout: no adapter folder {args.sft_adapter}; pass --sft-adapter DIR\n")
    from essa.files import write_json

    out = Path(args.out)
    record = out / f"{args.set}.json"
    # what the SFT eval file in --out was made for: written before any eval, so a killed run's file is never reused for another
    ident = {"sft_adapter": args.sft_adapter, "set": args.set, "rows": args.rows if args.set == "fresh" else None}
    if record.exists():
        old = json.loads(record.read_text())
        if any(old.get(k) != v for k, v in ident.items()):
            ap.exit(2, f"fresh_heldout: {record} was made for another SFT adapter or row count; pass another --out\n")
    out.mkdir(parents=True, exist_ok=True)
    if not record.exists():
        write_json(record, ident)
    commands, reused = [], []
    t0 = time.time()
    load0 = os.getloadavg()
    if args.set == "fresh":
        name, data, keep = f"fresh{args.rows}", out / f"fresh{args.rows}.jsonl", None
        if not data.exists():
            from essa.tasks.ifeval_data import write_jsonl
            rows = fresh_rows(args.rows)
            if len(rows) < args.rows:
                ap.exit(2, f"fresh_heldout: only {len(rows)} fresh prompts; pass --rows {len(rows)} or fewer\n")
            write_jsonl(rows, data)
    elif args.set == "study":
        name, (data, keep) = "heldout", study_heldout(out)
    else:
        name, data, keep = "ifeval", None, None
    sft = eval_counts(Path(args.sft_adapter), out / f"eval-{name}-sft.jsonl", data, 256, commands, reused, keep)
    essa = [eval_counts(r / "adapters" / "best", r / f"eval-{name}-essa.jsonl", data, 256, commands, reused, keep)
            for r in runs]
    result = {
        "study": "fresh-heldout", "command": " ".join(["fresh_heldout.py"] + (argv or sys.argv[1:])),
        "env": {k: v for k, v in os.environ.items() if k.startswith("ESSA_")},
        "device": "cpu", "cpu": platform.machine(), "cores": os.cpu_count(), "load_average_start": load0,
        "load_average_end": os.getloadavg(), "wall_seconds": round(time.time() - t0, 1),
        **ident,
        "prompts": len(sft["inst"]), "instructions": int(sft["inst"].sum()),
        "runs": {str(r): paired_bootstrap(sft, e) for r, e in zip(runs, essa)},
        "pooled": paired_bootstrap(sft, essa), "commands": commands, "reused": reused}
    write_json(record, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
