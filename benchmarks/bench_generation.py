"""Generation throughput: HF generate vs the population engine (base only, and K distinct candidates).

Prints one JSON object: device, versions, command, and per (mode, batch) slot- and useful-tokens/s
and peak memory. Rows = K candidates × P GSM8K prompts (greedy).

    python benchmarks/bench_generation.py                       # GPU defaults: batches 64 256 1024, 256 tokens
    python benchmarks/bench_generation.py --batches 16 64 --new-tokens 64     # CPU-sized
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


def peak_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapter", default=None, help="SFT adapter (default: a random rank-8 q/k/v/o LoRA)")
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--candidates", type=int, default=16, help="K distinct candidates in mode (c)")
    ap.add_argument("--modes", nargs="+", default=["hf", "engine_base", "engine_pop"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--sigma", type=float, default=0.05, help="std of the candidate offsets")
    args = ap.parse_args()

    import peft
    import transformers
    from peft import LoraConfig, get_peft_model

    from essa.chat import chat_prompts
    from essa.engine import PopulationEngine
    from essa.genome import load_genome
    from essa.models import load_model
    from essa.sampling import SamplingConfig
    from essa.tasks import MATH_SYSTEM_PROMPT, get_task, load_rows

    model, tok = load_model(args.model, device=args.device, dtype=args.dtype)
    device = next(model.parameters()).device
    adapter = args.adapter
    if adapter is None:
        torch.manual_seed(0)
        pm = get_peft_model(copy.deepcopy(model).float().cpu(), LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights="gaussian"))
        for n, p in pm.named_parameters():  # make B non-zero so the LoRA path matters
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.01)
        adapter = tempfile.mkdtemp(prefix="essa-bench-adapter-")
        pm.save_pretrained(adapter)
        del pm
    genome = load_genome(adapter)
    rows = load_rows(get_task("gsm8k"), "test")
    all_ids = chat_prompts(tok, [r["prompt"] for r in rows], MATH_SYSTEM_PROMPT)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    results = []
    for batch in args.batches:
        for mode in args.modes:
            if mode == "hf":
                ids = all_ids[:batch]
                T = max(map(len, ids))
                inp = torch.full((batch, T), tok.pad_token_id)
                att = torch.zeros((batch, T), dtype=torch.long)
                for i, x in enumerate(ids):
                    inp[i, T - len(x):] = torch.tensor(x)
                    att[i, T - len(x):] = 1
                reset_peak(device)
                t, c = time.perf_counter(), time.process_time()
                with torch.inference_mode():
                    out = model.generate(inp.to(device), attention_mask=att.to(device), max_new_tokens=args.new_tokens,
                                         do_sample=False, pad_token_id=tok.pad_token_id)
                sync(device)
                dt, dc = time.perf_counter() - t, time.process_time() - c
                gen = out[:, T:]
                steps = gen.shape[1]
                eos_id = model.generation_config.eos_token_id
                stop = [eos_id] if isinstance(eos_id, int) else list(eos_id or [])
                useful = 0
                for row in gen.tolist():
                    n = len(row)
                    for j, t_ in enumerate(row):
                        if t_ in stop:
                            n = j + 1
                            break
                    useful += n
                slot = batch * steps
            else:
                K = 1 if mode == "engine_base" else min(args.candidates, batch)
                P = batch // K
                ids = all_ids[:P]
                m = copy.deepcopy(model)
                eng = PopulationEngine(m, tok, genome if mode == "engine_pop" else None)
                cands = None
                if mode == "engine_pop":
                    cands = np.random.default_rng(0).normal(0, args.sigma, (K, genome.dimension)).astype(np.float32)
                reset_peak(device)
                t, c = time.perf_counter(), time.process_time()
                eng.generate(ids, cands, sampling)
                sync(device)
                dt, dc = time.perf_counter() - t, time.process_time() - c
                slot, useful = eng.stats.slot_tokens, eng.stats.useful_tokens
                del m, eng
            rec = {"mode": mode, "batch": batch, "seconds": round(dt, 3), "slot_tokens": slot, "useful_tokens": useful,
                   "slot_tok_s": round(slot / dt, 1), "useful_tok_s": round(useful / dt, 1),
                   # CPU time of this process: a steadier measure than wall time on a shared CPU
                   "cpu_seconds": round(dc, 3), "slot_tok_per_cpu_s": round(slot / dc, 1),
                   "peak_memory_mb": round(peak_mb(device), 1)}
            results.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    print(json.dumps({
        "benchmark": "generation", "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "model": args.model, "new_tokens": args.new_tokens, "candidates": args.candidates,
        "dtype": str(next(model.parameters()).dtype), "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()), "results": results}, indent=2))


if __name__ == "__main__":
    main()
