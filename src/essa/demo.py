"""`essa demo` (what `make demo` runs): SFT warm start → ESSA on GSM8K → SFT vs ESSA on test → report.

Real model (SmolLM2-135M-Instruct, resolved offline), CPU-sized settings: a few minutes of SFT, a few
ESSA generations with a small population and mini-batch, and a small test subset. The numbers it
prints show the pipeline working end to end; they are not a benchmark result (see README).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from essa.sampling import SamplingConfig


def run_demo(fast: bool = False, out: str = "runs/demo") -> dict:  # noqa: C901
    from essa.report import write_report
    from essa.sft import SFTConfig, run_sft
    from essa.trainer import TrainConfig, train

    root = Path(out)
    t0 = time.perf_counter()
    sft_dir = root / "sft"
    if not (sft_dir / "adapter_config.json").exists():
        print("essa demo: 1/3 SFT warm start (LoRA r=8 on q/k/v/o, GSM8K SFT split)")
        run_sft(SFTConfig(output_dir=str(sft_dir), max_steps=3 if fast else 15, batch_size=4, grad_accum=1,
                          max_length=320, lr=2e-4, overwrite=True))
    else:
        print(f"essa demo: 1/3 reusing the SFT adapter in {sft_dir}")
    t_sft = time.perf_counter() - t0
    run_dir = root / "essa"
    print("essa demo: 2/3 ESSA: CMA-ES over the adapter's singular values, fitness = GSM8K exact answer")
    cfg = TrainConfig(adapter=str(sft_dir), task="gsm8k", output_dir=str(run_dir), popsize=4 if fast else 6,
                      generations=1 if fast else 4, batch_size=2 if fast else 4, val_size=4 if fast else 12,
                      eval_every=2, test_limit=4 if fast else 16, seed=0, sigma0=0.02,
                      generation=SamplingConfig(max_new_tokens=32 if fast else 128), device="cpu")
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    summary = train(cfg)
    print("essa demo: 3/3 report")
    report = write_report(run_dir)
    result = {"sft_seconds": round(t_sft, 1), "essa_seconds": summary["wall_seconds"],
              "test_n": summary.get("test_n"), "test_accuracy_sft": summary.get("test_sft"),
              "test_accuracy_essa_best": summary.get("test_best"), "test_accuracy_essa_final": summary.get("test_final"),
              "best_adapter": summary["adapters"]["best"], "plot": report["plot"], "report": report["markdown"]}
    print(json.dumps(result, indent=2))
    print(f"essa demo: done in {time.perf_counter() - t0:.0f} s. Plot: {report['plot']}  "
          f"ESSA adapter (PEFT): {summary['adapters']['best']}")
    return result
