"""Where the native engine's CPU decode time goes (issue 15: profile before optimising).

Runs the population engine (16 distinct candidates, greedy, GSM8K prompts, SmolLM2 fp32) under
torch.profiler for each batch size and prints one JSON object: tok/s, and the self CPU time grouped as
matmul (aten::mm/addmm/bmm/linear kernels and oneDNN's packed linear, ``mkldnn::_linear_pointwise``),
attention, elementwise ops, sampling/argmax, everything else in ATen, and what is outside the ops (Python,
the loop); plus the top ops. The same grouping is given per phase: the prefill calls and the decode steps
(``DecoderNet.prefill`` / ``DecoderNet.step``, each wrapped in a ``record_function`` here), with
milliseconds per decode step. The achieved matmul rate is the FLOPs of every prefilled and decoded token
(2 × non-embedding parameters each) over the matmul time; prefill is part of the run (each (candidate,
prompt) row prefills).

    python benchmarks/profile_decode.py --rows 64 256 --new-tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import numpy as np
import torch

GROUPS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_weight_int8pack_mm",
               "mkldnn::_linear_pointwise"),
    "attention": ("aten::_scaled_dot_product", "aten::scaled_dot_product", "aten::softmax", "aten::_softmax",
                  "_C::cpu_attention_with_kv_cache", "_C::cpu_attn_reshape_and_cache", "_C::get_scheduler_metadata"),
    "elementwise": ("aten::mul", "aten::add", "aten::silu", "aten::neg", "aten::cat", "aten::pow", "aten::rsqrt", "aten::mean",
                    "_C::rms_norm", "_C::fused_add_rms_norm", "_C::rotary_embedding"),
    "sampling": ("aten::argmax", "aten::topk", "aten::sort", "aten::multinomial", "aten::max"),
    "copies": ("aten::copy_", "aten::index", "aten::index_select", "aten::index_copy_", "aten::clone", "aten::contiguous",
               "aten::to", "aten::_to_copy", "aten::empty", "aten::zeros", "aten::fill_", "aten::select", "aten::slice"),
}


OPS = ("aten::", "mkldnn::", "_C::")  # op namespaces counted (_C: vLLM-CPU's paged attention); else Python, the loop
PHASES = ("prefill", "step")   # DecoderNet methods timed as phases


def group_of(name: str) -> str:
    for g, prefixes in GROUPS.items():
        if name.startswith(prefixes):
            return g
    return "other_aten" if name.startswith(OPS) else "other"


def label_phases():
    """Wrap DecoderNet.prefill and .step in a profiler label of their name (this process only)."""
    from essa.fast_decode import DecoderNet

    def labelled(name, fn):
        def run(*a, **k):
            with torch.profiler.record_function(name):
                return fn(*a, **k)
        return run

    for name in PHASES:
        setattr(DecoderNet, name, labelled(name, getattr(DecoderNet, name)))


def phase_times(prof) -> dict:
    """Per phase label: calls, wall ms per call and the self time of the ops under it by group (seconds)."""
    out = {}

    def walk(e, acc):
        if e.name.startswith(OPS):
            acc[group_of(e.name)] = acc.get(group_of(e.name), 0.0) + e.self_cpu_time_total / 1e6
        for c in e.cpu_children:
            walk(c, acc)

    for e in prof.events():
        if e.name in PHASES:
            rec = out.setdefault(e.name, {"calls": 0, "seconds": 0.0, "by_group": {}})
            rec["calls"] += 1
            rec["seconds"] += e.cpu_time_total / 1e6
            for c in e.cpu_children:
                walk(c, rec["by_group"])
    for rec in out.values():
        rec["ms_per_call"] = round(rec["seconds"] * 1e3 / rec["calls"], 1)
        rec["seconds"] = round(rec["seconds"], 2)
        rec["by_group"] = {k: round(v, 2) for k, v in sorted(rec["by_group"].items(), key=lambda kv: -kv[1])}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from essa.chat import chat_prompts
    from essa.engines import build_engine
    from essa.models import load_model
    from essa.sampling import SamplingConfig
    from essa.tasks import get_task, load_rows

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from helpers import random_adapter

    label_phases()
    tmp_dir = tempfile.TemporaryDirectory(prefix="profile-decode-")  # removed when the process exits
    tmp = tmp_dir.name
    model, _ = load_model(args.model, device="cpu", dtype="float32")
    random_adapter(model, f"{tmp}/adapter", std=0.02)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    del model
    engine = build_engine(args.model, f"{tmp}/adapter", device="cpu", dtype="float32")
    task = get_task("gsm8k")
    rows = load_rows(task, task.test_split, limit=max(args.rows) // args.candidates)
    ids = chat_prompts(engine.tokenizer, [r["prompt"] for r in rows], task.system_prompt)
    X = np.random.default_rng(0).normal(0, 0.05, (args.candidates, engine.genome.dimension))
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)
    out = {"command": " ".join(sys.argv), "device": f"cpu ({os.cpu_count()} cores)", "threads": args.threads,
           "python": platform.python_version(), "torch": torch.__version__, "load_average_start": os.getloadavg(),
           "engine": "auto (ESSA_FAST=" + os.environ.get("ESSA_FAST", "unset") + ")",
           "flops_per_token_G": round(2 * n_params / 1e9, 3), "runs": {}}
    engine.generate(ids[:1], X[:1], SamplingConfig(max_new_tokens=2))  # warm-up
    for n_rows in args.rows:
        prompts = ids[: n_rows // args.candidates]
        tok0, t0 = engine.stats.useful_tokens, time.perf_counter()
        slot0, prompt0 = engine.stats.slot_tokens, engine.stats.prompt_tokens
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            engine.generate(prompts, X, sampling)
        wall = time.perf_counter() - t0
        useful, slots = engine.stats.useful_tokens - tok0, engine.stats.slot_tokens - slot0
        prompt_tokens = engine.stats.prompt_tokens - prompt0
        events = [e for e in prof.key_averages() if e.key.startswith(OPS)]
        total_self = sum(e.self_cpu_time_total for e in events) / 1e6
        groups: dict[str, float] = {}
        for e in events:
            groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total / 1e6
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:10]
        mm = groups.get("matmul", 0.0)
        out["runs"][str(n_rows)] = {
            "wall_seconds_profiled": round(wall, 2), "useful_tok_s": round(useful / wall, 1), "slot_tok_s": round(slots / wall, 1),
            "seconds_by_group": {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
            "outside_ops_seconds": round(max(0.0, wall - total_self), 2),
            "phases": phase_times(prof),
            "matmul_share_of_wall": round(mm / wall, 3),
            "prompt_tokens": prompt_tokens, "decode_slot_tokens": slots,
            # prefill and decode tokens each cost about 2 x parameters of matmul FLOPs (attention aside)
            "matmul_GFLOP_s": round((slots + prompt_tokens) * 2 * n_params / 1e9 / max(mm, 1e-9), 1),
            "top_ops": [{"op": e.key, "self_s": round(e.self_cpu_time_total / 1e6, 2), "calls": e.count} for e in top]}
        print(json.dumps({n_rows: out["runs"][str(n_rows)]}), file=sys.stderr)
    out["load_average_end"] = os.getloadavg()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
