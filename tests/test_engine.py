"""Population engine: per-row singular values reproduce merged-adapter HF generate, exactly."""

import copy

import numpy as np
import pytest
import torch
from peft import PeftModel

from essa import EssaError
from essa.chat import chat_prompts
from essa.engine import PopulationEngine
from essa.genome import export_adapter, load_genome
from essa.models import load_model
from essa.sampling import SamplingConfig
from helpers import random_adapter

PROMPTS = ["What is 2+2?", "Name a color.", "Write a long poem about the sea and the sky, please."]


def hf_greedy(model, prompt_ids, eos, pad, new_tokens):
    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    model, tok = load_model(tiny_model_dir, device="cpu", dtype="float32")
    adapter = random_adapter(model, tmp_path_factory.mktemp("tiny-adapter") / "a")
    genome = load_genome(adapter)
    cands = np.random.default_rng(0).normal(0, 0.5, (4, genome.dimension)).astype(np.float32)
    return model, tok, genome, cands


def test_engine_matches_merged_hf_generate_tiny(tiny, tmp_path):
    model, tok, genome, cands = tiny
    prompts = chat_prompts(tok, PROMPTS, "Be brief.")
    engine = PopulationEngine(copy.deepcopy(model), tok, genome)
    out = engine.generate(prompts, cands, SamplingConfig(max_new_tokens=24))
    assert len(out) == 4 and all(len(x) == 3 for x in out)
    distinct = set()
    for k in range(4):
        merged = PeftModel.from_pretrained(copy.deepcopy(model), export_adapter(genome, cands[k], tmp_path / f"c{k}"))
        merged = merged.merge_and_unload().eval()
        for p in range(3):
            ref = hf_greedy(merged, prompts[p], engine.eos_ids, engine.pad_id, 24)
            got = out[k][p][0]
            assert got.token_ids == ref, (k, p)
            assert got.finish_reason == ("eos" if ref[-1] in engine.eos_ids else "length")
            distinct.add(tuple(got.token_ids))
    assert len(distinct) > 4, "candidates should produce different completions"


def test_batch_composition_does_not_change_results(tiny):
    model, tok, genome, cands = tiny
    prompts = chat_prompts(tok, PROMPTS, None)
    engine = PopulationEngine(copy.deepcopy(model), tok, genome)
    together = engine.generate(prompts, cands, SamplingConfig(max_new_tokens=16))
    alone = engine.generate(prompts, cands[2:3], SamplingConfig(max_new_tokens=16))
    assert [c[0].token_ids for c in alone[0]] == [c[0].token_ids for c in together[2]]
    # micro-batches of one row give the same result as one big batch
    small = PopulationEngine(copy.deepcopy(model), tok, genome, max_batch_rows=1)
    assert [[c[0].token_ids for c in x] for x in small.generate(prompts, cands, SamplingConfig(max_new_tokens=16))] == \
        [[c[0].token_ids for c in x] for x in together]
    assert small.stats.micro_batches == 12


def test_sampling_reproducible_and_seeded(tiny):
    model, tok, genome, cands = tiny
    prompts = chat_prompts(tok, PROMPTS, None)
    engine = PopulationEngine(copy.deepcopy(model), tok, genome)
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=3, num_samples=2)
    ids = lambda out: [[[s.token_ids for s in x] for x in y] for y in out]  # noqa: E731
    a, b = engine.generate(prompts, cands, cfg), engine.generate(prompts, cands, cfg)
    assert ids(a) == ids(b)
    c = engine.generate(prompts, cands, SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=4, num_samples=2))
    assert ids(a) != ids(c)
    assert a[0][0][0].token_ids != a[0][0][1].token_ids, "two samples of one prompt should differ"


def test_stop_strings_and_lengths(tiny):
    model, tok, genome, _ = tiny
    prompts = chat_prompts(tok, PROMPTS[:1], None)
    engine = PopulationEngine(copy.deepcopy(model), tok, genome)
    full = engine.generate(prompts, None, SamplingConfig(max_new_tokens=20))[0][0][0]
    assert len(full.token_ids) == 20 and full.finish_reason == "length"
    stop = full.text[5:9]
    cut = engine.generate(prompts, None, SamplingConfig(max_new_tokens=20, stop=[stop]))[0][0][0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.text.startswith(cut.text)
    with pytest.raises(EssaError):
        engine.generate(prompts, None, SamplingConfig(max_new_tokens=0))
    with pytest.raises(EssaError, match="dimension"):
        engine.generate(prompts, np.zeros((2, genome.dimension + 1)), SamplingConfig(max_new_tokens=2))


def test_out_of_memory_shrinks_and_retries(tiny, monkeypatch):
    model, tok, genome, cands = tiny
    prompts = chat_prompts(tok, PROMPTS, None)
    engine = PopulationEngine(copy.deepcopy(model), tok, genome)
    ref = engine.generate(prompts, cands, SamplingConfig(max_new_tokens=8))
    real = engine._decode
    calls = []

    def flaky(chunk, *a, **kw):
        calls.append(len(chunk))
        if len(chunk) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(chunk, *a, **kw)

    monkeypatch.setattr(engine, "_decode", flaky)
    got = engine.generate(prompts, cands, SamplingConfig(max_new_tokens=8))
    assert [[c[0].token_ids for c in x] for x in got] == [[c[0].token_ids for c in x] for x in ref]
    assert engine.stats.oom_retries >= 2 and max(calls[2:]) <= 3
    monkeypatch.setattr(engine, "_decode", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(EssaError, match="out of memory"):
        engine.generate(prompts, cands, SamplingConfig(max_new_tokens=8))


def test_base_model_engine_matches_hf(tiny):
    model, tok, _, _ = tiny
    prompts = chat_prompts(tok, PROMPTS, None)
    engine = PopulationEngine(copy.deepcopy(model), tok, None)
    out = engine.generate(prompts, None, SamplingConfig(max_new_tokens=12))
    for p in range(3):
        assert out[0][p][0].token_ids == hf_greedy(model, prompts[p], engine.eos_ids, engine.pad_id, 12)


@pytest.mark.real
def test_engine_matches_merged_hf_generate_real(real_model_name, tmp_path):
    model, tok = load_model(real_model_name, device="cpu", dtype="float32")
    adapter = random_adapter(model, tmp_path / "a", std=0.02)
    genome = load_genome(adapter)
    cands = np.random.default_rng(1).normal(0, 0.05, (2, genome.dimension)).astype(np.float32)
    prompts = chat_prompts(tok, ["What is 12 times 3?", "Natalia sold 48 clips in April and half as many in May. "
                                 "How many clips did she sell?"], "Please reason step by step.")
    engine = PopulationEngine(copy.deepcopy(model), tok, genome)
    out = engine.generate(prompts, cands, SamplingConfig(max_new_tokens=32))
    for k in range(2):
        merged = PeftModel.from_pretrained(copy.deepcopy(model), export_adapter(genome, cands[k], tmp_path / f"c{k}"))
        merged = merged.merge_and_unload().eval()
        for p in range(2):
            assert out[k][p][0].token_ids == hf_greedy(merged, prompts[p], engine.eos_ids, engine.pad_id, 32), (k, p)
