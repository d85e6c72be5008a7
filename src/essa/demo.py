"""`essa demo` (what `make demo` runs): ESSA teaches SmolLM2 an answer format, measured on held-out questions.

Real model (SmolLM2-135M-Instruct, resolved offline), CPU-sized, a few minutes:

1. The SFT warm start is the adapter shipped in ``essa/data/demo/sft-adapter`` (LoRA r = 8 on q/k/v/o, made
   by the README's IFEval SFT recipe: `essa data ifeval-like ... --responses` then `essa sft`).
2. The task: yes-no questions with IFEval's constrained-response instruction ("Answer with one of the
   following options: My answer is yes. / no. / maybe."), :func:`essa.tasks.ifeval_data.make_answer_format`.
   The SFT adapter mostly answers "Your answer is yes." and fails the check. Questions about 30 topics
   are training data (ESSA's validation rows are carved from them); questions about the 10 other topics
   are held out from everything and only scored at the end.
3. ESSA: CMA-ES over the adapter's 1920 singular values, fitness = the IFEval check on a mini-batch.
4. SFT start vs ESSA on the held-out questions, with a paired bootstrap interval, and the report's plot.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from essa.sampling import SamplingConfig


def demo_adapter() -> Path:
    """The SFT adapter shipped with the package (see the module docstring and README, "Demo")."""
    from essa.tasks import data_path

    return data_path("demo", "sft-adapter")


#: written first into the demo's folder: a later `essa demo --out` may replace what that folder holds, nothing else
DEMO_MARKER = "essa-demo.json"


def claim_demo_folder(root: Path):
    """Refuse a folder that is neither empty nor an earlier demo's (the demo rewrites its data files and
    replaces its ESSA run), before anything is written; then mark it as the demo's."""
    from essa import EssaError
    from essa.files import write_json

    if root.exists() and not root.is_dir():
        raise EssaError(f"--out {root} is a file; choose a folder for the demo")
    if root.exists() and any(root.iterdir()) and not (root / DEMO_MARKER).is_file():
        raise EssaError(f"--out {root} is not empty and is not an essa demo folder; choose a new or empty folder "
                        f"(nothing in it was changed)")
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / DEMO_MARKER, {"kind": "essa demo"})


def demo_config(train_path: Path, heldout_path: Path, run_dir: Path, seed: int = 0, fast: bool = False):
    """The demo's ESSA run as a :class:`essa.trainer.TrainConfig` (``benchmarks/probe_demo_axes.py`` varies it)."""
    from essa.trainer import TrainConfig

    return TrainConfig(adapter=str(demo_adapter()), task="ifeval", train_data=str(train_path), test_data=str(heldout_path),
                       output_dir=str(run_dir), seed=seed, popsize=4 if fast else 8, batch_size=4 if fast else 16,
                       generations=1 if fast else 10, val_size=4 if fast else 40, eval_every=2,
                       test_limit=8 if fast else None, calibration_prompts=1 if fast else 4,
                       generation=SamplingConfig(max_new_tokens=32), device="cpu")


def run_demo(fast: bool = False, out: str = "runs/demo", seed: int = 0) -> dict:
    from essa.files import run_kind
    from essa.report import write_report
    from essa.tasks.ifeval_data import make_answer_format, write_jsonl
    from essa.trainer import train

    t0 = time.perf_counter()
    root = Path(out)
    claim_demo_folder(root)
    train_rows, heldout = make_answer_format()
    train_path = write_jsonl(train_rows, root / "train.jsonl")
    heldout_path = write_jsonl(heldout, root / "heldout.jsonl")
    print(f"essa demo: 1/3 data: {len(train_rows)} training questions ({train_path}), {len(heldout)} held-out "
          f"questions on other topics ({heldout_path}); SFT start: {demo_adapter()}")
    run_dir = root / "essa"
    if run_kind(run_dir) == "train":  # this demo folder's previous ESSA run (claim_demo_folder checked whose folder it is)
        shutil.rmtree(run_dir)
    print("essa demo: 2/3 ESSA: CMA-ES over the SFT adapter's singular values, fitness = the answer-format check")
    summary = train(demo_config(train_path, heldout_path, run_dir, seed, fast))
    print("essa demo: 3/3 report")
    report = write_report(run_dir)
    gain = summary.get("test_best_minus_sft", {})
    result = {"seconds": round(time.perf_counter() - t0, 1), "essa_seconds": summary["wall_seconds"],
              "generations": summary["generations"], "heldout_n": summary.get("test_n"),
              "heldout_sft": summary.get("test_sft"), "heldout_essa": summary.get("test_best"),
              "heldout_gain": gain.get("diff"), "heldout_gain_ci95": gain.get("ci95"),
              "best_adapter": summary["adapters"]["best"], "plot": report["plot"], "report": report["markdown"]}
    print(json.dumps(result, indent=2))
    print(f"essa demo: held-out questions following the format: SFT {result['heldout_sft']:.2f} -> ESSA "
          f"{result['heldout_essa']:.2f} ({result['heldout_n']} questions on topics never trained on; ESSA - SFT "
          f"{gain.get('diff', float('nan')):+.2f}, 95 % paired bootstrap interval {gain.get('ci95')}). "
          f"Done in {result['seconds']:.0f} s. Plot: {report['plot']}  ESSA adapter (PEFT): {summary['adapters']['best']}")
    return result
