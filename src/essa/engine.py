"""Population engine: generate for a whole ES population in one batched decode.

Every candidate shares the frozen SVD bases of the genome and differs only in its singular values, so
each adapted projection computes, for a batch row that belongs to candidate c::

    y = base(x) + scaling · (((x · Vh_Aᵀ) ⊙ s_A[c]) · (U_Aᵀ · Vh_Bᵀ) ⊙ s_B[c]) · U_Bᵀ

i.e. three small shared matmuls (in→r, r→r, r→out) and two per-row diagonal scalings. No adapter is
merged, swapped or copied per candidate: a batch mixes rows of any candidates freely.

The decode loop (``_decode``) is the hot path: one forward of the batch per new token with the
model's KV cache, greedy or seeded sampling, EOS/stop-string detection, and finished rows dropped
from the batch as the batch thins out. Micro-batches are sized to a memory budget; an out-of-memory
error halves the micro-batch and retries.

Seeded sampling is *counter based*: the random number of a row at a step is a hash of
(seed, prompt index, sample index, step), not of the row's position in the batch or its candidate.
So the draws do not depend on batch composition (up to floating-point effects of batch shape on the
logits), and all candidates see the same random numbers for the same prompt/sample (common random
numbers: less noise when candidates are compared).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from essa import EssaError
from essa.config import help_field
from essa.genome import Genome, singular_values
from essa.models import is_oom
from essa.population_lora import LORA_DTYPE, install_population_lora
from essa.sampling import SamplingConfig, left_pad, row_keys, sample_tokens
from essa.stopping import Completion, EndTracker


@dataclass
class EngineConfig:
    """Where and how the population engine runs: one declaration for every command that generates
    (`essa train`, `essa grpo` validation/test, `essa eval`, the Python API)."""

    device: str = help_field("auto", "auto | cpu | cuda | cuda:N")
    dtype: str = help_field("auto", "auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16")
    quantization: str = help_field("none", "base-weight quantization of the engine (generation, validation, test; never "
                                   "training): none | int8 | int4")
    memory_budget_gb: float | None = help_field(None, "memory the engine may plan for (default: 80% of free GPU memory, "
                                                "4 GiB on CPU)")
    max_batch_rows: int | None = help_field(None, "cap on rows per micro-batch")
    engine: str = help_field("native", "what generates: native (essa's decode: the static-cache fast decoder when the "
                             "architecture is supported, else HF) | fast (native, fast decoder required) | hf (native, "
                             "HF forward) | vllm (vLLM, the population as multi-LoRA requests: essa.vllm_engine)")
    vllm: dict = help_field({}, "engine vllm: keyword arguments for vllm.LLM (tensor_parallel_size, "
                            "gpu_memory_utilization, quantization, max_loras, ...)")

    def validate_engine(self):
        from essa.models import check_device

        check_device(self.device)
        if self.engine not in ENGINE_KINDS:
            raise EssaError(f"unknown engine {self.engine!r}; use one of: {', '.join(ENGINE_KINDS)}")
        if not isinstance(self.vllm, dict):
            raise EssaError(f"vllm must be a mapping of vllm.LLM keyword arguments, got {self.vllm!r}")
        if self.vllm and self.engine != "vllm":
            raise EssaError("vllm options are set but engine is not vllm; set engine: vllm or remove them")
        if self.engine == "vllm" and self.quantization != "none":
            raise EssaError(f"quantization {self.quantization} is the native engine's (torchao); with engine vllm use a "
                            f"pre-quantized model (AWQ/GPTQ) or vllm: {{quantization: ...}}")
        if self.memory_budget_gb is not None and not self.memory_budget_gb > 0:
            raise EssaError(f"memory_budget_gb must be > 0 (or null for the default), got {self.memory_budget_gb}")
        if self.max_batch_rows is not None and self.max_batch_rows < 1:
            raise EssaError(f"max_batch_rows must be >= 1 (or null), got {self.max_batch_rows}")


def engine_settings(cfg) -> EngineConfig:
    """The :class:`EngineConfig` part of a config that extends it (`essa train`, `essa eval`)."""
    import dataclasses

    return EngineConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(EngineConfig)})


#: native engine kind -> PopulationEngine's ``fast`` argument ("auto": the old name of "native")
NATIVE_KINDS = {"native": None, "auto": None, "fast": True, "hf": False}
ENGINE_KINDS = [*NATIVE_KINDS, "vllm"]


@dataclass
class GenerationStats:
    rows: int = 0
    slot_tokens: int = 0      #: batch rows × decode steps actually run (what the hardware computed)
    useful_tokens: int = 0    #: tokens that belong to a completion (up to and including its end)
    prompt_tokens: int = 0
    seconds: float = 0.0
    micro_batches: int = 0
    oom_retries: int = 0


# --------------------------------------------------------------------------------- the engine

def all_pairs(K: int, n_prompts: int) -> list[tuple[int, int]]:
    """Every (candidate, prompt) pair, candidate-major: the rows of a whole-population generation."""
    return [(k, p) for k in range(K) for p in range(n_prompts)]


def by_candidate(flat: list, K: int, n_prompts: int) -> list[list]:
    """Per-pair outputs of :func:`all_pairs` regrouped as ``out[k][p]``."""
    return [flat[k * n_prompts:(k + 1) * n_prompts] for k in range(K)]


def eos_token_ids(generation_config, tokenizer) -> list[int]:
    """Every token that ends a completion: the generation config's EOS ids and the tokenizer's."""
    eos = generation_config.eos_token_id if generation_config else None
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        eos.append(tokenizer.eos_token_id)
    return sorted(set(eos))


def check_context(limit: int | None, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, what: str):
    """One line naming the first prompt that, with ``max_new_tokens``, does not fit the context of ``limit`` tokens
    (an engine's ``context_length``; None = unknown, nothing checked)."""
    if not limit:
        return
    for i, ids in enumerate(prompt_ids):
        if len(ids) + max_new_tokens > limit:
            raise EssaError(f"{what} prompt {i + 1} is {len(ids)} tokens: with max_new_tokens {max_new_tokens} it exceeds "
                            f"the model's context of {limit} tokens; shorten or drop that row, or lower max_new_tokens")


class PopulationEngine:
    """Batched generation for (candidate, prompt, sample) rows on one model.

    ``model`` is a plain HF causal LM (base weights, possibly quantized); ``genome`` the SVD genome of
    the SFT adapter, or None to generate with the base model alone.
    """

    def __init__(self, model, tokenizer, genome: Genome | None = None, clamp_min: float | None = None,
                 memory_budget_gb: float | None = None, max_batch_rows: int | None = None,
                 fast: bool | None = None):
        """fast: the hand-written static-cache decode path (``essa.fast_decode``) instead of HF forward;
        None = when the architecture is supported (env ESSA_FAST=0/1 overrides), True = required
        (EssaError if unsupported), False = the HF path."""
        self.model, self.tokenizer, self.genome, self.clamp_min = model, tokenizer, genome, clamp_min
        self.device = next(model.parameters()).device
        self.wrappers = install_population_lora(model, genome) if genome is not None else []
        self.lora_dtype = LORA_DTYPE if self.wrappers else None
        from essa import fast_decode
        self._fast = None  # built before the memory budget is measured (it may hold fused weight copies)
        if fast if fast is not None else fast_decode.auto_enabled(model, self.wrappers):
            self._fast = fast_decode.FastDecoder(model, self.wrappers)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.context_length = getattr(cfg, "max_position_embeddings", None)
        self._kv_bytes_per_token = self._kv_bytes(cfg)
        self.memory_budget = self._memory_budget(memory_budget_gb)
        self.max_batch_rows = max_batch_rows
        self.eos_ids = eos_token_ids(model.generation_config, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]
        self.vocab = cfg.vocab_size
        self.stats = GenerationStats()
        self._oom_cap: int | None = None

    # ---- memory
    def _kv_bytes(self, cfg) -> int:
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        elem = next(self.model.parameters()).element_size()
        return 2 * cfg.num_hidden_layers * heads * head_dim * max(elem, 2)

    def _memory_budget(self, gb: float | None) -> int:
        if gb is not None:
            return int(gb * 2**30)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(0.8 * free)
        return 4 * 2**30

    def rows_per_batch(self, prompt_len: int, max_new: int) -> int:
        """How many rows fit the memory budget: KV cache + logits per row, plus the prefill's activations —
        per row on the HF path (one prefill of the whole micro-batch), for at most `FastDecoder.prefill_rows`
        rows on the fast path (it prefills in calls of bounded size)."""
        cfg = self.model.config
        hidden = getattr(cfg, "hidden_size", 1024)
        inter = getattr(cfg, "intermediate_size", 4 * hidden)
        heads = getattr(cfg, "num_attention_heads", 16)
        elem = 4
        kv_tokens = prompt_len + max_new if self._fast is None else self._fast.kv_slots(prompt_len + max_new)
        per_row = (self._kv_bytes_per_token * kv_tokens
                   + 4 * self.vocab * 8)                                # logits, probabilities, sort
        prefill = (prompt_len * (6 * hidden + 3 * inter) * elem         # prefill activations of one layer
                   + heads * prompt_len * prompt_len * elem)            # attention scores (math SDPA)
        n = max(1, self.memory_budget // (per_row + prefill))
        cap = None if self._fast is None else self._fast.prefill_rows(prompt_len)   # rows per prefill call
        if cap is not None and n > cap:
            n = max(n, (self.memory_budget - cap * prefill) // per_row)
        return int(min(n, self.max_batch_rows or n))

    # ---- rows
    def _set_rows(self, s_A: torch.Tensor | None, s_B: torch.Tensor | None):
        for i, w in enumerate(self.wrappers):
            w.s_A = None if s_A is None else s_A[:, i].unsqueeze(1)
            w.s_B = None if s_B is None else s_B[:, i].unsqueeze(1)

    def generate(self, prompt_ids: Sequence[Sequence[int]], candidates=None, sampling: SamplingConfig | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[list[list[Completion]]]:
        """Completions for every (candidate, prompt, sample): ``out[k][p][s]``.

        candidates: [K, dimension] offsets (numpy or torch); None = one candidate with zero offset
        (the adapter itself, or the base model when the engine has no genome).
        progress(rows_done, tokens): called after every micro-batch.
        """
        K = 1 if candidates is None else len(candidates)
        flat = self.generate_pairs(prompt_ids, candidates, all_pairs(K, len(prompt_ids)), sampling, progress)
        return by_candidate(flat, K, len(prompt_ids))

    @torch.inference_mode()
    def generate_pairs(self, prompt_ids: Sequence[Sequence[int]], candidates, pairs: Sequence[tuple[int, int]],
                       sampling: SamplingConfig | None = None,
                       progress: Callable[[int, int], None] | None = None) -> list[list[Completion]]:
        """Completions for the given (candidate, prompt) pairs only: ``out[i][s]`` for pair i.

        Lets each candidate have its own prompts (independent mini-batches) in one batched run.
        """
        import time

        cfg = sampling or SamplingConfig()
        if cfg.max_new_tokens < 1:
            raise EssaError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
        if not pairs:
            return []
        if self.genome is not None:
            dim = self.genome.dimension
            cand = torch.zeros(1, dim) if candidates is None else torch.as_tensor(np.asarray(candidates), dtype=torch.float32)
            if cand.dim() != 2:
                raise EssaError(f"candidates must be a [K, {dim}] matrix, got shape {tuple(cand.shape)}")
            s_A, s_B = singular_values(self.genome, cand, self.clamp_min)        # [K, M, r]
            s_A, s_B = s_A.to(self.device, self.lora_dtype), s_B.to(self.device, self.lora_dtype)
        else:
            if candidates is not None and len(candidates) != 1:
                raise EssaError("the engine has no genome (no adapter); pass candidates=None")
            s_A = s_B = None
        S = cfg.num_samples
        # rows sorted by prompt length so a micro-batch holds similar lengths (less padding)
        order = sorted(range(len(pairs)), key=lambda i: (len(prompt_ids[pairs[i][1]]), pairs[i][1]))
        rows = [(i, pairs[i][0], pairs[i][1], s) for i in order for s in range(S)]
        out: list[list[Completion | None]] = [[None] * S for _ in pairs]
        t0, start = time.perf_counter(), 0
        while start < len(rows):
            longest = max(len(prompt_ids[p]) for _, _, p, _ in rows[start:start + 4096])
            n = min(self.rows_per_batch(longest, cfg.max_new_tokens), self._oom_cap or len(rows))
            while True:
                chunk = rows[start:start + n]
                try:
                    results = self._decode([(k, p, s) for _, k, p, s in chunk], prompt_ids, s_A, s_B, cfg)
                    break
                except Exception as e:  # noqa: BLE001 - only OOM is handled, everything else re-raised
                    if not is_oom(e):
                        raise
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    if n == 1:
                        raise EssaError("out of memory generating a single row; lower max_new_tokens, "
                                        "use quantization, or a smaller model") from None
                    n = max(1, n // 2)
                    self._oom_cap = n  # remember: later micro-batches start at the size that fitted
                    self.stats.oom_retries += 1
            for (i, _, _, s), c in zip(chunk, results):
                out[i][s] = c
            start += len(chunk)
            self.stats.micro_batches += 1
            if progress:
                progress(start, self.stats.useful_tokens)
        self.stats.rows += len(rows)
        self.stats.seconds += time.perf_counter() - t0
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def completion_logprobs(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
                            candidates) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced next-token log-probabilities of given completions under every candidate.

        Returns (logp [K, P, T, V] float32 on the CPU, mask [P, T] bool): position t of prompt p is
        the distribution that predicts ``completion_ids[p][t]``; T is the longest completion. One
        forward (HF path, right padding) of the P rows per candidate. For measuring how far candidates
        move the model (``essa.explore``), not for decoding.
        """
        if self.genome is None:
            raise EssaError("completion_logprobs needs an engine with a genome (an adapter)")
        cand = torch.as_tensor(np.asarray(candidates), dtype=torch.float32)
        K, P = cand.shape[0], len(prompt_ids)
        T = max(1, max(len(c) for c in completion_ids))
        seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
        L = max(len(x) for x in seqs)
        ids = torch.full((P, L), self.pad_id, dtype=torch.long)
        att = torch.zeros((P, L), dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, :len(x)], att[i, :len(x)] = torch.as_tensor(x), 1
        mask = torch.zeros((P, T), dtype=torch.bool)
        for i, c in enumerate(completion_ids):
            mask[i, :len(c)] = True
        s_A, s_B = singular_values(self.genome, cand, self.clamp_min)
        s_A, s_B = s_A.to(self.device, self.lora_dtype), s_B.to(self.device, self.lora_dtype)
        out = torch.zeros((K, P, T, self.vocab), dtype=torch.float32)
        try:
            for k in range(K):
                self._set_rows(s_A[[k] * P], s_B[[k] * P])
                logits = self.model(input_ids=ids.to(self.device), attention_mask=att.to(self.device)).logits
                for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
                    if c:
                        sl = logits[i, len(p) - 1:len(p) - 1 + len(c)].float()
                        out[k, i, :len(c)] = torch.log_softmax(sl, dim=-1)[:, :self.vocab].cpu()
        finally:
            self._set_rows(None, None)
        return out, mask

    def _decode(self, chunk, prompt_ids, s_A, s_B, cfg: SamplingConfig) -> list[Completion]:
        """The hot loop: prefill the chunk, then one forward per new token until every row ended."""
        from transformers import DynamicCache

        dev, N = self.device, len(chunk)
        tracker = EndTracker(self.tokenizer, self.eos_ids, cfg.stop, N)
        if self._fast is not None and self._fast.can_run(max(len(prompt_ids[p]) for _, p, _ in chunk)
                                                         + cfg.max_new_tokens):
            self._fast.decode(chunk, prompt_ids, s_A, s_B, cfg, tracker, self.pad_id, self.stats)
            return self._finish(tracker)
        ids, mask = left_pad([prompt_ids[p] for _, p, _ in chunk], self.pad_id)
        ids, mask = ids.to(dev), mask.long().to(dev)
        keys = row_keys(chunk, cfg.num_samples)
        cand = torch.tensor([k for k, _, _ in chunk], dtype=torch.long)
        if s_A is not None:
            self._set_rows(s_A[cand.to(dev)], s_B[cand.to(dev)])
        else:
            self._set_rows(None, None)
        self.stats.prompt_tokens += int(mask.sum())

        alive = torch.arange(N)                 # original row index of each batch row
        cache = DynamicCache()
        position = (mask.cumsum(-1) - 1).clamp_min(0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        next_pos = position[:, -1:] + 1
        try:
            for step in range(cfg.max_new_tokens):
                tok = sample_tokens(out.logits[:, -1, :], cfg, keys[alive], step)
                keep = [j for j, (row, t) in enumerate(zip(alive.tolist(), tok.tolist()))
                        if not tracker.finished[row] and not tracker.push(row, t)]
                self.stats.slot_tokens += len(alive)
                if not keep or step == cfg.max_new_tokens - 1:
                    break
                # drop finished rows from the batch once they are a quarter of it
                if len(alive) - len(keep) >= max(1, len(alive) // 4):
                    sel = torch.tensor(keep, device=dev)
                    cache.batch_select_indices(sel)
                    mask, next_pos, tok = mask[sel], next_pos[sel], tok[sel]
                    alive = alive[torch.tensor(keep)]
                    if s_A is not None:
                        rows_idx = cand[alive].to(dev)
                        self._set_rows(s_A[rows_idx], s_B[rows_idx])
                mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype, device=dev)], dim=1)
                out = self.model(input_ids=tok.unsqueeze(-1), attention_mask=mask, position_ids=next_pos,
                                 past_key_values=cache, use_cache=True)
                next_pos = next_pos + 1
        finally:
            self._set_rows(None, None)
        return self._finish(tracker)

    def close(self):
        """Nothing to release (the model is garbage-collected with the engine); as :meth:`VLLMEngine.close`."""

    def _finish(self, tracker: EndTracker) -> list[Completion]:
        self.stats.useful_tokens += sum(len(t) for t in tracker.generated)
        return tracker.completions()
