"""Instructions followed per IFEval instruction type: an SFT eval file against ESSA eval files (issue 11).

Reads `essa eval --task ifeval` outputs (per-row ``instruction_id_list`` and ``loose_list``) of the same prompts and
prints one JSON object: per type the number of instructions, how many the SFT adapter follows (loose) and each ESSA
adapter's change, plus the totals and how many SFT completions stopped at the token limit. ``--clean`` keeps the
rows of the learning study's clean held-out set (`clean_heldout_keys`: the 183 of its 200 generated prompts the demo
never trains on). Reads only: writes nothing.

    python benchmarks/heldout_by_type.py --sft runs/axes/sft/eval-heldout-sft.jsonl --clean \
        --essa runs/axes/generations=30,batch_size=32/s{0,1,2,3}/eval-heldout-essa.jsonl
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study_ifeval import clean_heldout_keys, study_split  # noqa: E402  (benchmarks/ is not a package)


def load(path: str, keep: set[str] | None) -> dict[str, dict]:
    rows = (json.loads(x) for x in Path(path).read_text().splitlines() if x.strip())
    return {r["key"]: r for r in rows if keep is None or r["key"] in keep}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sft", required=True, help="the SFT adapter's eval file (.jsonl)")
    ap.add_argument("--essa", nargs="+", required=True, help="ESSA adapters' eval files of the same prompts")
    ap.add_argument("--clean", action="store_true", help="keep the study's clean held-out rows only (default: every row)")
    args = ap.parse_args(argv)
    for p in [args.sft] + args.essa:
        if not Path(p).is_file():
            ap.exit(2, f"heldout_by_type: no file {p}; give `essa eval --output` files\n")
    keep = clean_heldout_keys(study_split()[0]) if args.clean else None
    sft, runs = load(args.sft, keep), [load(p, keep) for p in args.essa]
    missing = [p for p, r in zip(args.essa, runs) if set(r) != set(sft)]
    if missing:
        ap.exit(2, f"heldout_by_type: {missing[0]} holds other prompts than {args.sft}; give eval files of the same data\n")
    n, base = collections.Counter(), collections.Counter()
    got = [collections.Counter() for _ in runs]
    for key, row in sft.items():
        for j, ins in enumerate(row["instruction_id_list"]):
            n[ins] += 1
            base[ins] += row["loose_list"][j]
            for g, run in zip(got, runs):
                g[ins] += run[key]["loose_list"][j]
    print(json.dumps({
        "command": " ".join(["heldout_by_type.py"] + (argv or sys.argv[1:])), "rows": len(sft),
        "instructions": sum(n.values()), "sft_followed": sum(base.values()),
        "essa_change": [sum(g.values()) - sum(base.values()) for g in got],
        "sft_finish_reasons": dict(collections.Counter(r.get("finish_reason") for r in sft.values())),
        "by_type": {ins: {"n": c, "sft": base[ins], "essa_change": [g[ins] - base[ins] for g in got]}
                    for ins, c in n.most_common()}}, indent=1))


if __name__ == "__main__":
    main()
