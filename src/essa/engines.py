"""The engine a command generates with, by the ``engine`` setting: ``native`` (and its variants ``fast`` / ``hf``,
`essa.engine`) or ``vllm`` (`essa.vllm_engine`). Both take the same calls (``generate``, ``generate_pairs``,
``completion_logprobs``) and return the same ``Completion`` objects."""

from __future__ import annotations

from essa.engine import NATIVE_KINDS, EngineConfig, PopulationEngine


def build_engine(model: str, adapter: str | None, engine: EngineConfig | None = None, alpha: float = 1.0,
                 clamp_min: float | None = None, balance: bool = True, **engine_fields):
    """Base model (+ quantization) with the adapter's genome installed as the per-row LoRA path (native), or a
    vLLM engine serving the genome's candidates as LoRA adapters. ``engine``: where and how it runs (or its fields
    as keywords: device=..., quantization=...)."""
    from essa.genome import load_genome
    from essa.models import load_model, load_tokenizer, quantize_model, resolve_model

    engine = engine or EngineConfig(**engine_fields)
    engine.validate_engine()
    genome = load_genome(adapter, alpha, balance) if adapter else None
    if engine.engine == "vllm":
        from essa.vllm_engine import VLLMEngine

        return VLLMEngine(resolve_model(model), load_tokenizer(model), genome, clamp_min, engine)
    m, tok = load_model(model, device=engine.device, dtype=engine.dtype)
    quantize_model(m, engine.quantization)
    return PopulationEngine(m, tok, genome, clamp_min=clamp_min, memory_budget_gb=engine.memory_budget_gb,
                            max_batch_rows=engine.max_batch_rows, fast=NATIVE_KINDS[engine.engine])
