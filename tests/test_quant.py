"""Quantized inference: INT8 / INT4 base weights (torchao) under the population engine.

Agreement thresholds below are teacher-forced top-1 agreement (argmax per position of fixed GSM8K
chat sequences, 64 tokens each) between the quantized base + per-row LoRA (zero offset) and the fp32
base + the same LoRA; measured on CPU, torch 2.13, torchao 0.18.
"""

import copy
import json
import sys

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

pytest.importorskip("torchao", reason="quantization needs torchao (pip install --no-deps torchao)")

from essa import EssaError  # noqa: E402
from essa.chat import chat_prompts  # noqa: E402
from essa.engine import PopulationEngine
from essa.genome import export_adapter, load_genome, singular_values  # noqa: E402
from essa.models import load_model, quantize_model  # noqa: E402
from essa.quant import QuantizedLinear, is_quantized, model_memory_bytes, quantize_base_weights  # noqa: E402
from essa.sampling import SamplingConfig
from essa.tasks import data_path  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(model, path, std, seed=0):
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                         init_lora_weights=False))
    for n, p in pm.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p, std=std)
    pm.save_pretrained(path)
    return path


def sequences(tok, n, length=64):
    """n fixed token sequences: GSM8K test question + reference answer in the chat template."""
    rows = [json.loads(line) for line in open(data_path("gsm8k", "test.jsonl"))][:n]
    out = []
    for r in rows:
        text = tok.apply_chat_template([{"role": "user", "content": r["question"]},
                                        {"role": "assistant", "content": r["answer"]}], tokenize=False)
        out.append(tok(text, add_special_tokens=False)["input_ids"][-length:])
    return torch.tensor(out)


def forward_rows(engine, ids, offsets):
    """Teacher-forced logits of every row of ids, row i with candidate offsets[i]."""
    s_A, s_B = singular_values(engine.genome, torch.as_tensor(np.asarray(offsets), dtype=torch.float32))
    engine._set_rows(s_A.to(engine.lora_dtype), s_B.to(engine.lora_dtype))
    try:
        with torch.inference_mode():
            return engine.model(input_ids=ids).logits.float()
    finally:
        engine._set_rows(None, None)


def quantized_engine(model, tok, genome, mode):
    m = quantize_base_weights(copy.deepcopy(model), mode)
    return PopulationEngine(m, tok, genome)


def check_structure(model, mode):
    layers = model.model.layers
    for layer in layers:
        for name, mod in layer.named_modules():
            if name.rsplit(".", 1)[-1] in BLOCK_LINEARS:
                base = getattr(mod, "base", mod)
                assert isinstance(base, QuantizedLinear) and is_quantized(base.weight), (name, type(base.weight))
    assert not is_quantized(model.lm_head.weight) and type(model.lm_head) is torch.nn.Linear
    assert model.essa_quantization == mode


def check_engine(model, tok, genome, ref_engine, ids, mode, min_agreement, new_tokens):
    """Structure, memory, per-row LoRA effect, generation, and top-1 agreement with the fp32 engine."""
    engine = quantized_engine(model, tok, genome, mode)
    check_structure(engine.model, mode)
    assert model_memory_bytes(engine.model) < model_memory_bytes(ref_engine.model)
    dim = genome.dimension
    far = np.random.default_rng(1).normal(0, 2.0, dim).astype(np.float32)
    zero = np.zeros(dim, np.float32)
    # per-row LoRA: the same sequence in 3 rows, candidates (zero, far, zero)
    x = ids[:1].repeat(3, 1)
    logits = forward_rows(engine, x, [zero, far, zero])
    assert torch.allclose(logits[0], logits[2], atol=1e-3)
    assert (logits[0] - logits[1]).abs().max() > 0.1, "a different candidate must change the logits"
    # generation: two very different candidates give completions, and different ones
    prompts = chat_prompts(tok, ["What is 12 times 3?"], "Be brief.")
    out = engine.generate(prompts, np.stack([zero, far]), SamplingConfig(max_new_tokens=new_tokens))
    a, b = out[0][0][0], out[1][0][0]
    assert a.token_ids and b.token_ids and a.token_ids != b.token_ids
    # zero offset = the SFT adapter: top-1 agreement with the fp32 base + adapter (teacher forced)
    got = forward_rows(engine, ids, [zero] * len(ids)).argmax(-1)
    ref = forward_rows(ref_engine, ids, [zero] * len(ids)).argmax(-1)
    agreement = (got == ref).float().mean().item()
    print(f"{mode}: top-1 agreement {agreement:.3f}", file=sys.stderr)
    assert agreement >= min_agreement, f"{mode}: top-1 agreement {agreement:.3f} < {min_agreement}"
    return engine


# ------------------------------------------------------------------------------ tiny model

@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    model, tok = load_model(tiny_model_dir, device="cpu", dtype="float32")
    adapter = make_adapter(model, tmp_path_factory.mktemp("quant-adapter") / "a", std=0.3)
    genome = load_genome(adapter)
    return model, tok, genome, adapter, PopulationEngine(copy.deepcopy(model), tok, genome)


# Measured on the tiny random Llama (8 sequences x 64 tokens): int8 99.8 %, int4 82.2 %
# (random Gaussian weights: int4 with groups of 32 is a real approximation there).
@pytest.mark.parametrize("mode,min_agreement", [("int8", 0.97), ("int4", 0.70)])
def test_quantized_engine_tiny(tiny, mode, min_agreement):
    model, tok, genome, _, ref_engine = tiny
    engine = check_engine(model, tok, genome, ref_engine, sequences(tok, 8), mode, min_agreement, 12)
    # the engine's fast decode path (essa.fast_decode) calls quantized bases as modules: same tokens as HF forward
    hf = PopulationEngine(copy.deepcopy(engine.model), tok, genome, fast=False)
    prompts = chat_prompts(tok, ["What is 2+2?", "Name a color, please."], None)
    cands = np.random.default_rng(0).normal(0, 0.5, (2, genome.dimension)).astype(np.float32)
    ids = lambda e: [[c[0].token_ids for c in x] for x in e.generate(prompts, cands, SamplingConfig(max_new_tokens=12))]  # noqa: E731
    assert ids(engine) == ids(hf)


def test_memory_accounting(tiny):
    model, _, _, _, _ = tiny
    plain = sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())
    assert model_memory_bytes(model) == plain
    block = sum(mod.weight.numel() for n, mod in model.named_modules() if n.rsplit(".", 1)[-1] in BLOCK_LINEARS)
    saved = {}
    for mode in ("int8", "int4"):  # (a torchao weight's .nbytes is its logical fp size, not what it holds)
        q = quantize_base_weights(copy.deepcopy(model), mode)
        saved[mode] = (model_memory_bytes(model) - model_memory_bytes(q)) / block  # bytes per weight
    # fp32 (4 bytes) -> int8 (1 byte + an fp32 scale per row): saves just under 3 bytes per weight
    assert 2.9 < saved["int8"] <= 3.0, saved
    # -> int4 (half a byte + a bf16 scale and zero point per 32 weights): saves 3.375 bytes per weight
    assert 3.3 < saved["int4"] <= 3.5, saved


def test_lm_head_and_tied_embeddings_stay_full_precision(tiny):
    model, _, _, _, _ = tiny
    q = quantize_base_weights(copy.deepcopy(model), "int8")
    assert q.model.embed_tokens.weight.dtype == torch.float32 and not is_quantized(q.lm_head.weight)
    assert q.essa_quantized_layers == 7 * len(q.model.layers)
    assert quantize_base_weights(q, "int8") is q  # idempotent
    with pytest.raises(EssaError, match="already quantized"):
        quantize_base_weights(q, "int4")


def test_genome_and_exported_adapter_do_not_depend_on_quantization(tiny_model_dir, tiny, tmp_path):
    """Inference precision touches neither the genome nor exported adapters (SFT stays fp32)."""
    from essa.engines import build_engine

    _, _, _, adapter, _ = tiny
    engines = {q: build_engine(tiny_model_dir, str(adapter), device="cpu", dtype="float32", quantization=q)
               for q in ("none", "int8")}
    assert isinstance(engines["int8"].wrappers[0].base, QuantizedLinear)
    assert not isinstance(engines["none"].wrappers[0].base, QuantizedLinear)
    offset = np.random.default_rng(2).normal(0, 0.1, engines["none"].genome.dimension).astype(np.float32)
    files = {}
    for q, engine in engines.items():
        engine.generate(chat_prompts(engine.tokenizer, ["Hi"]), offset[None], SamplingConfig(max_new_tokens=4))
        out = export_adapter(engine.genome, offset, tmp_path / q)
        files[q] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert files["none"] == files["int8"]
    g0, g1 = engines["none"].genome, engines["int8"].genome
    assert torch.equal(g0.s_A, g1.s_A) and torch.equal(g0.s_B, g1.s_B) and torch.equal(g0.U_A, g1.U_A)


def test_errors(tiny, monkeypatch):
    model, _, _, _, _ = tiny
    with pytest.raises(EssaError, match="unknown quantization 'int3'"):
        quantize_model(copy.deepcopy(model), "int3")
    with pytest.raises(EssaError, match="unknown quantization 'fp8'"):
        quantize_base_weights(copy.deepcopy(model), "fp8")
    with pytest.raises(EssaError, match="group_size"):
        quantize_base_weights(copy.deepcopy(model), "int4", group_size=48)
    odd = torch.nn.Sequential(torch.nn.Linear(20, 8))  # in_features not a multiple of 32
    with pytest.raises(EssaError, match="multiple of 32"):
        quantize_base_weights(odd, "int4")
    monkeypatch.setitem(sys.modules, "torchao", None)  # as if torchao were not installed
    with pytest.raises(EssaError, match="pip install --no-deps torchao"):
        quantize_base_weights(copy.deepcopy(model), "int8")


# ------------------------------------------------------------------------------ real model

@pytest.fixture(scope="module")
def real(real_model_name, tmp_path_factory):
    model, tok = load_model(real_model_name, device="cpu", dtype="float32")
    genome = load_genome(make_adapter(model, tmp_path_factory.mktemp("quant-real") / "a", std=0.02))
    return model, tok, genome, PopulationEngine(copy.deepcopy(model), tok, genome), sequences(tok, 4)


# Measured on SmolLM2-135M-Instruct (fp32 CPU, LoRA r=8 on all 7 projections, 4 sequences x 64
# tokens): int8 96.9 %, int4 97.3 %. int4 is this good because the built-in SmolLM2 weights come from
# a Q4_1 GGUF (int4, groups of 32): int4 with groups of 32 re-quantizes them almost exactly; with
# groups of 64 the agreement drops to 75.6 % (measured over 8 sequences; int8 97.1 %, int4/32 98.0 % there).
@pytest.mark.real
@pytest.mark.parametrize("mode,min_agreement", [("int8", 0.93), ("int4", 0.93)])
def test_quantized_engine_real(real, mode, min_agreement):
    model, tok, genome, ref_engine, ids = real
    check_engine(model, tok, genome, ref_engine, ids, mode, min_agreement, 16)
