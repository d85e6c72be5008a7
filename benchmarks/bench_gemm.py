"""CPU GEMMs at SmolLM2-135M's projection shapes: `F.linear` against oneDNN's packed-weight linear.

The native engine's CPU path runs every plain fp32 projection and the lm_head through
``essa.fast_decode.packed_linear`` (weights reordered once by ``pack_weight``). This measures why: GFLOP/s
of both at the decode's row counts, alternated in rounds in one process (the best round of each is
reported, and the ratio of those), plus whether they agree (``torch.allclose``, 1e-4). Prints one JSON object.

    python benchmarks/bench_gemm.py --rows 64 256 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

# SmolLM2-135M: hidden 576, 9 query / 3 KV heads of 64, MLP 1536, vocabulary 49,152 ([out, in] of each weight)
SHAPES = {"q/o": (576, 576), "k/v": (192, 576), "gate/up": (1536, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def gflops(fn, flop: float, seconds: float = 0.5) -> float:
    fn()
    n = max(3, int(seconds * 150e9 / flop))   # about `seconds` at 150 GFLOP/s
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return flop * n / (time.perf_counter() - t) / 1e9


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)

    from essa.fast_decode import pack_weight, packed_linear, packing_available

    if not packing_available():
        sys.exit("this torch build has no oneDNN packed linear (torch.ops.mkldnn._reorder_linear_weight)")
    torch.manual_seed(0)
    results = []
    for m in args.rows:
        for name, (out_f, in_f) in SHAPES.items():
            x, w = torch.randn(m, in_f), torch.randn(out_f, in_f) * 0.02
            wp = pack_weight(w)
            flop = 2.0 * m * out_f * in_f
            best = {"linear": 0.0, "packed": 0.0}
            for _ in range(args.rounds):   # alternated: both see the same machine load
                best["linear"] = max(best["linear"], gflops(lambda: F.linear(x, w), flop))
                best["packed"] = max(best["packed"], gflops(lambda: packed_linear(x, wp), flop))
            results.append({"rows": m, "shape": name, "out": out_f, "in": in_f,
                            "linear_gflops": round(best["linear"], 1), "packed_gflops": round(best["packed"], 1),
                            "packed/linear": round(best["packed"] / best["linear"], 2),
                            "allclose": bool(torch.allclose(F.linear(x, w), packed_linear(x, wp), atol=1e-4, rtol=1e-4))})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"benchmark": "gemm", "command": " ".join(["python"] + sys.argv),
                      "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
                      "torch": torch.__version__, "rounds": args.rounds, "load_average": list(os.getloadavg()),
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
