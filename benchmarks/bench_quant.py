"""Quantized inference: model memory, population-engine throughput and GSM8K accuracy for none/int8/int4.

Prints one JSON object: device, versions, command, and per quantization mode the model memory
(``essa.quant.model_memory_bytes``: packed weights + scales, tied weights once), the population
engine's tokens/s for each batch size (rows = K candidates × P GSM8K prompts, greedy) and the GSM8K
test accuracy of an adapter (the zero offset, i.e. the adapter as is) on the first ``--limit``
examples.

    python benchmarks/bench_quant.py                                   # GPU defaults: batches 256 1024, 256 tokens
    python benchmarks/bench_quant.py --adapter runs/sft --limit 200    # accuracy of your SFT adapter
    python benchmarks/bench_quant.py --batches 16 --new-tokens 32 --limit 16 --threads 1   # CPU-sized
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_adapter(model) -> str:
    """A rank-8 q/k/v/o LoRA with non-zero B (as benchmarks/bench_generation.py builds)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(model).float().cpu(), LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights="gaussian"))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    path = tempfile.mkdtemp(prefix="essa-bench-adapter-")
    pm.save_pretrained(path)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", default=None, help="LoRA adapter folder (default: a random rank-8 q/k/v/o LoRA)")
    ap.add_argument("--modes", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 1024], help="rows per throughput run")
    ap.add_argument("--new-tokens", type=int, default=256, help="max new tokens of the throughput runs")
    ap.add_argument("--candidates", type=int, default=16, help="K distinct candidates per throughput run")
    ap.add_argument("--sigma", type=float, default=0.05, help="std of the candidate offsets")
    ap.add_argument("--limit", type=int, default=100, help="GSM8K test examples for accuracy (0: skip)")
    ap.add_argument("--eval-new-tokens", type=int, default=512, help="max new tokens of the accuracy run")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import peft
    import transformers

    from essa.chat import chat_prompts
    from essa.engine import GenerationStats, PopulationEngine
    from essa.evaluate import generate_and_score
    from essa.genome import load_genome
    from essa.models import load_model, quantize_model
    from essa.quant import model_memory_bytes
    from essa.sampling import SamplingConfig
    from essa.tasks import get_task, load_rows

    task = get_task("gsm8k")
    base, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    device = next(base.parameters()).device
    adapter = args.adapter or random_adapter(base)
    genome = load_genome(adapter)
    rows = load_rows(task, task.test_split)
    all_ids = chat_prompts(tok, [r["prompt"] for r in rows], task.system_prompt)
    eval_rows = rows[:args.limit] if args.limit else []
    results = []
    for mode in args.modes:
        model = copy.deepcopy(base)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        t = time.perf_counter()
        quantize_model(model, mode)
        sync(device)
        quant_s = time.perf_counter() - t
        rec = {"quantization": mode, "quantize_seconds": round(quant_s, 2),
               "model_memory_bytes": model_memory_bytes(model),
               "quantized_layers": getattr(model, "essa_quantized_layers", 0)}
        rec["model_memory_mb"] = round(rec["model_memory_bytes"] / 2**20, 1)
        engine = PopulationEngine(model, tok, genome)
        rec["engine_memory_bytes"] = model_memory_bytes(model)  # + the per-row LoRA buffers
        rec["lora_dtype"] = str(engine.lora_dtype)
        rec["throughput"] = []
        for batch in args.batches:
            K = min(args.candidates, batch)
            ids = all_ids[:batch // K]
            cands = np.random.default_rng(0).normal(0, args.sigma, (K, genome.dimension)).astype(np.float32)
            engine.generate(ids[:1], cands[:1], SamplingConfig(max_new_tokens=2))  # warm-up
            engine.stats = GenerationStats()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t = time.perf_counter()
            engine.generate(ids, cands, SamplingConfig(max_new_tokens=args.new_tokens))
            sync(device)
            dt = time.perf_counter() - t
            st = engine.stats
            tp = {"batch": K * len(ids), "candidates": K, "prompts": len(ids), "seconds": round(dt, 3),
                  "slot_tokens": st.slot_tokens, "useful_tokens": st.useful_tokens,
                  "slot_tok_s": round(st.slot_tokens / dt, 1), "useful_tok_s": round(st.useful_tokens / dt, 1),
                  "micro_batches": st.micro_batches}
            if device.type == "cuda":
                tp["peak_memory_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
            rec["throughput"].append(tp)
            print(json.dumps({"quantization": mode, **tp}), file=sys.stderr, flush=True)
        if eval_rows:
            t = time.perf_counter()
            (metrics, completions), = generate_and_score(
                engine, task, eval_rows, None, SamplingConfig(max_new_tokens=args.eval_new_tokens), task.system_prompt)
            dt = time.perf_counter() - t
            rec["gsm8k"] = {"accuracy": metrics["accuracy"], "n": len(eval_rows), "seconds": round(dt, 2),
                            "max_new_tokens": args.eval_new_tokens,
                            "mean_completion_tokens": round(float(np.mean([len(c.token_ids) for c in completions])), 1)}
            print(json.dumps({"quantization": mode, "gsm8k": rec["gsm8k"]}), file=sys.stderr, flush=True)
        results.append(rec)
        del engine, model
    try:
        import torchao
        ao_version = torchao.__version__
    except ImportError:
        ao_version = None
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        dev = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    print(json.dumps({
        "benchmark": "quantization", "command": " ".join(sys.argv), "device": dev,
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "torchao": ao_version, "model": args.model, "adapter": args.adapter or "random rank-8 q/k/v/o LoRA",
        "dtype": str(next(base.parameters()).dtype), "new_tokens": args.new_tokens,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],  # > CPU count: timings are noisy
        "results": results}, indent=2))


if __name__ == "__main__":
    main()
