"""The mean of several ESSA runs' best offsets as one adapter (a "soup"), scored like probe_demo_axes (issue 11).

Independent ESSA runs of the demo's configuration learn its answer format each along its own direction of the
genome (their best offsets are mutually orthogonal, `benchmarks/NOTES.md`). In a linear picture a run's change to
the model is a shared part (the format) plus its own random part; the mean of k runs' offsets keeps the shared
part at full size and shrinks each run's own part k-fold. This probe tests that picture: it averages the
best-by-validation offsets of the given runs (same SFT adapter, α, balancing and dimension), exports the mean as a
PEFT adapter, and scores it like ``probe_demo_axes.py``: the runs' validation rows (carved from the training data
with each run's seed: a check that the soup keeps the format, not a selection), the demo's held-out questions, all
541 IFEval prompts and the learning study's held-out generated prompts (greedy; ESSA − SFT with paired bootstrap
intervals, 10,000 draws, 95 %). The soup's cost is the sum of its runs' ESSA wall times (reported).

    python benchmarks/probe_soup.py --out runs/soup --name b32-s01 \
        --runs runs/axes/generations=30,batch_size=32/s0 runs/axes/generations=30,batch_size=32/s1

The SFT adapter's eval files are reused from ``--sft-evals`` (default ``runs/axes/sft``, the demo-axes probe's,
made with the same commands). Outputs that exist are reused. Prints one JSON object (also written to
``OUT/NAME/probe.json``).
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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_ifeval import eval_counts, eval_ifeval, paired_bootstrap, study_heldout  # noqa: E402  (benchmarks/ is not a package)


def soup_offset(cfgs: list[dict], genomes: list[dict]) -> tuple[np.ndarray, dict]:
    """The mean of the runs' best offsets (their `config.json` and best adapter's `essa_genome.json`), and the settings
    they share; ValueError when those differ."""
    keys = {(c["adapter"], c["alpha"], c["balance"], c["clamp_min"], g["dimension"]) for c, g in zip(cfgs, genomes)}
    if len(keys) != 1:
        raise ValueError(f"the runs differ in (SFT adapter, alpha, balance, clamp_min, dimension): {sorted(keys)}; "
                         "give runs of one configuration")
    adapter, alpha, balance, clamp_min, dim = keys.pop()
    offsets = [np.asarray(g["offset"], dtype=np.float64) for g in genomes]
    return np.mean(offsets, axis=0), {"adapter": adapter, "alpha": alpha, "balance": balance, "clamp_min": clamp_min,
                                      "dimension": dim, "offset_norms": [round(float(np.linalg.norm(o)), 2) for o in offsets]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="`essa train` output folders (adapters/best, config.json)")
    ap.add_argument("--out", default="runs/soup")
    ap.add_argument("--name", required=True, help="the soup's folder under --out")
    ap.add_argument("--sft-evals", default="runs/axes/sft", help="folder of the SFT adapter's eval files")
    args = ap.parse_args(argv)
    runs = [Path(r).resolve() for r in args.runs]
    for r in runs:
        if not all((r / f).is_file() for f in ("adapters/best/essa_genome.json", "config.json", "summary.json")):
            ap.exit(2, f"probe_soup: {r} lacks adapters/best/essa_genome.json, config.json or summary.json; "
                       "give finished `essa train` output folders\n")
    if len(runs) < 2:
        ap.exit(2, "probe_soup: --runs needs at least two run folders (a soup of one run is that run)\n")
    cfgs = [json.loads((r / "config.json").read_text()) for r in runs]
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    try:
        mean, shared = soup_offset(cfgs, [json.loads((r / "adapters/best/essa_genome.json").read_text()) for r in runs])
    except ValueError as e:
        ap.exit(2, f"probe_soup: {e}\n")
    folder = Path(args.out).resolve() / args.name
    adapter = folder / "adapter"
    # a folder already there is this soup's (its adapter, exported first, names its runs): reused, never mixed with another's
    if folder.is_dir() and any(folder.iterdir()) and (not (adapter / "essa_genome.json").is_file() or json.loads(
            (adapter / "essa_genome.json").read_text()).get("soup_of") != [str(r) for r in runs]):
        ap.exit(2, f"probe_soup: {folder} holds another soup's outputs (or no adapter); give another --name or remove it\n")

    import torch

    from essa.files import atomic_write_text
    from essa.genome import export_adapter, load_genome
    from essa.tasks import get_task
    from essa.tasks.base import split_rl_data
    from essa.tasks.ifeval_data import write_jsonl

    folder.mkdir(parents=True, exist_ok=True)
    commands, reused = [], []
    t0 = time.perf_counter()
    if not (adapter / "adapter_config.json").is_file():
        genome = load_genome(shared["adapter"], alpha=shared["alpha"], balance=shared["balance"])
        export_adapter(genome, torch.tensor(mean, dtype=torch.float32), adapter, clamp_min=shared["clamp_min"],
                       metadata={"soup_of": [str(r) for r in runs]})
    else:
        reused.append(str(adapter))
    # the runs' validation rows (each run's own carve-out; the others trained on them) and the demo's held-out questions
    task = get_task(cfgs[0]["task"])
    val = [row for c in cfgs for row in split_rl_data(task, c["train_data"], c["val_size"], c["seed"])[0]]
    val_path = folder / "val.jsonl"
    if not val_path.exists():
        write_jsonl(val, val_path)
    tokens = cfgs[0]["generation"]["max_new_tokens"]
    small = {split: {name: eval_counts(ad, folder / f"eval-{split}-{name}.jsonl", data, tokens, commands, reused)
                     for name, ad in (("sft", Path(shared["adapter"])), ("soup", adapter))}
             for split, data in (("val", val_path), ("demo", Path(cfgs[0]["test_data"])))}
    sft_dir = Path(args.sft_evals).resolve()
    heldout_path, clean = study_heldout(sft_dir)
    sft = eval_ifeval(Path(shared["adapter"]), sft_dir, "sft", heldout_path, clean, commands, reused)
    soup = eval_ifeval(adapter, folder, "soup", heldout_path, clean, commands, reused)
    result = {"study": "soup", "command": shlex.join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])),
              "device": "cpu", "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
              "runs": [str(r) for r in runs], "seeds": [c["seed"] for c in cfgs], **shared,
              "soup_norm": round(float(np.linalg.norm(mean)), 2),
              "runs_essa_wall_seconds": [s["wall_seconds"] for s in summaries],
              "soup_essa_wall_seconds": round(sum(s["wall_seconds"] for s in summaries), 1),
              "runs_tokens_generated": [s.get("tokens_generated") for s in summaries],
              "runs_demo_heldout_best": [s["test_best"] for s in summaries],
              "val_rows": len(val),
              **{f"{split}_inst_loose": paired_bootstrap(small[split]["sft"], small[split]["soup"])["inst_loose"]
                 for split in ("val", "demo")},
              **{split: paired_bootstrap(sft[split], soup[split]) for split in ("ifeval", "heldout")},
              "heldout_rows": len(clean), "commands": commands, "reused": reused,
              "wall_seconds": round(time.perf_counter() - t0, 1), "load_average_end": os.getloadavg()}
    text = json.dumps(result, indent=2)
    atomic_write_text(folder / "probe.json", text)
    print(text)


if __name__ == "__main__":
    main()
