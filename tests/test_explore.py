"""Exploration that moves the model (issue: ESSA that learns): balanced genome, sigma0 auto, fp32
singular values, flat generations, every sample scored."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from essa.chat import chat_prompts
from essa.config import from_dict
from essa.engine import PopulationEngine
from essa.explore import MovementProbe, calibrate_sigma
from essa.genome import export_adapter, factors, load_genome
from essa.models import load_model, tiny_llama
from essa.sampling import SamplingConfig
from essa.trainer import TrainConfig, train
from helpers import random_adapter


def sft_like_adapter(model, path, seed=0):
    """A LoRA like a short SFT leaves it: A at PEFT's init scale (singular values ≈ 0.5), B small."""
    random_adapter(model, path, seed=seed, rank=4, targets=("q_proj", "v_proj"))
    w = load_file(str(path / "adapter_model.safetensors"))
    for k in w:
        if "lora_B" in k:
            w[k] = w[k] * 0.01
    from safetensors.torch import save_file
    save_file(w, str(path / "adapter_model.safetensors"))
    return path


def delta_w(A, B):
    return B.double() @ A.double()


def test_balancing_keeps_delta_w_and_exports(tmp_path):
    model = tiny_llama(seed=0)
    path = sft_like_adapter(model, tmp_path / "sft")
    raw, bal = load_genome(path, balance=False), load_genome(path)
    assert bal.balanced and not raw.balanced
    # unbalanced: A's and B's singular values differ in scale; balanced: the same Frobenius norm
    assert float(raw.s_A.norm(dim=1).min()) > 5 * float(raw.s_B.norm(dim=1).max())
    assert torch.allclose(bal.s_A.norm(dim=1), bal.s_B.norm(dim=1), rtol=1e-4)
    orig = load_file(str(path / "adapter_model.safetensors"))
    zero = np.zeros(bal.dimension)
    for name, (A, B) in factors(bal, zero).items():
        key = next(k for k in orig if k.endswith(f"{name}.lora_A.weight"))
        ref = delta_w(orig[key], orig[key.replace("lora_A", "lora_B")])
        assert (delta_w(A, B) - ref).norm() / ref.norm() < 1e-5
    # any offset: the exported adapter holds exactly the product the genome describes
    off = np.random.default_rng(0).normal(0, 0.05, bal.dimension)
    out = export_adapter(bal, off, tmp_path / "export")
    saved = load_file(str(out / "adapter_model.safetensors"))
    for name, (A, B) in factors(bal, off).items():
        key = next(k for k in saved if k.endswith(f"{name}.lora_A.weight"))
        assert torch.allclose(delta_w(saved[key], saved[key.replace("lora_A", "lora_B")]), delta_w(A, B), atol=1e-6)
    # the export of the zero offset re-loads to the same genome values (idempotent)
    again = load_genome(export_adapter(bal, zero, tmp_path / "zero"))
    assert torch.allclose(again.s_A, bal.s_A, atol=1e-5) and torch.allclose(again.s_B, bal.s_B, atol=1e-5)


def test_balancing_makes_both_halves_act(tmp_path):
    """Unbalanced, an offset on A's singular values barely moves the model; balanced, both halves do."""
    model = tiny_llama(seed=0)
    path = sft_like_adapter(model, tmp_path / "sft")
    ids = [[5, 9, 13, 2, 7, 11], [3, 4, 8, 10]]
    moves = {}
    for balance in (False, True):
        m, _ = load_model(str(_save(model, tmp_path / "m")), device="cpu", dtype="float32")
        g = load_genome(path, balance=balance)
        eng = PopulationEngine(m, _tok(), g, fast=False)
        k = g.k
        a_only = np.zeros(g.dimension).reshape(-1, 2, k)
        b_only = a_only.copy()
        a_only[:, 0] = 0.05
        b_only[:, 1] = 0.05
        comp = [[1, 2, 3], [4, 5]]
        lp, mask = eng.completion_logprobs(ids, comp, np.stack([np.zeros(g.dimension), a_only.reshape(-1), b_only.reshape(-1)]))
        d = [(lp[i] - lp[0]).abs()[mask].mean().item() for i in (1, 2)]
        moves[balance] = d
    ratio_raw = moves[False][0] / moves[False][1]
    ratio_bal = moves[True][0] / moves[True][1]
    assert ratio_raw < 0.2 and 0.3 < ratio_bal < 3, moves


def _save(model, path):
    if not path.exists():
        model.save_pretrained(path)
        _tok().save_pretrained(path)
    return path


def _tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({f"w{i}": i for i in range(64)} | {"[UNK]": 64}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", eos_token="w0", pad_token="w0")
    return tok


@pytest.fixture(scope="module")
def tiny_engine_parts(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("explore")
    model, tok = load_model(tiny_model_dir, device="cpu", dtype="float32")
    sft_like_adapter(model, root / "sft")
    return root, tiny_model_dir


def test_sigma0_auto_is_reproducible_and_hits_its_target(tiny_engine_parts):
    root, model_dir = tiny_engine_parts
    results = []
    for _ in range(2):
        m, tok = load_model(model_dir, device="cpu", dtype="float32")
        eng = PopulationEngine(m, tok, load_genome(root / "sft"))
        prompts = chat_prompts(tok, ["What is 2+2?", "Name a colour.", "Say hi."])
        probe = MovementProbe(eng, prompts, n_candidates=3, max_new_tokens=8, seed=5)
        results.append(calibrate_sigma(probe, target_kl=0.01))
    (s1, log1), (s2, log2) = results
    assert s1 == s2 and log1 == log2
    chosen = min(log1, key=lambda r: abs(r["sigma"] - s1))
    assert 0.5 * 0.01 < chosen["kl"] < 2 * 0.01, log1
    # KL grows with sigma
    pts = sorted((r["sigma"], r["kl"]) for r in log1)
    assert pts[0][1] < pts[-1][1]


def test_lora_path_and_singular_values_stay_fp32_under_bf16(tiny_engine_parts):
    root, model_dir = tiny_engine_parts
    m, tok = load_model(model_dir, device="cpu", dtype="bfloat16")
    g = load_genome(root / "sft")
    eng = PopulationEngine(m, tok, g)
    assert eng.lora_dtype == torch.float32
    seen = []
    w = eng.wrappers[0]
    hook = w.register_forward_hook(lambda mod, inp, out: seen.append((mod.s_A.dtype, mod.s_A.clone())))
    off = np.zeros(g.dimension)
    off[0] = 0.001  # below bf16's spacing near the singular values: must not be rounded away
    eng.completion_logprobs([[5, 6, 7]], [[8, 9]], off[None])
    hook.remove()
    dtype, sA = seen[0]
    assert dtype == torch.float32
    assert float(sA[0, 0, 0]) == pytest.approx(float(g.s_A[0, 0]) + 0.001, abs=1e-7)
    # and generation runs in bf16 with the fp32 middle (both decode paths)
    out = eng.generate([[5, 6, 7]], np.stack([off, -off]), SamplingConfig(max_new_tokens=3))
    assert len(out) == 2 and len(out[0][0][0].token_ids) >= 1


REWARDS = '''
import json, os
def constant(prompts, completions, **columns):
    return [0.5] * len(completions)

def counting(prompts, completions, **columns):
    with open(os.environ["ESSA_TEST_COUNT_FILE"], "a") as f:
        f.write(json.dumps(len(completions)) + "\\n")
    return [len(c) % 7 / 7 for c in completions]
'''


def _cfg(root, model_dir, out, **over):
    cfg = {"model": model_dir, "adapter": str(root / "sft"), "task": "gsm8k", "generations": 3, "popsize": 4,
           "sigma0": 0.3, "batch_size": 2, "val_size": 2, "test_limit": 0, "eval_every": 3,
           "generation": {"max_new_tokens": 5}, "output_dir": str(root / out), "device": "cpu",
           "tensorboard": False, "seed": 2}
    cfg.update(over)
    return from_dict(TrainConfig, cfg)


def test_flat_fitness_does_not_move_the_mean(tiny_engine_parts):
    root, model_dir = tiny_engine_parts
    (root / "rw.py").write_text(REWARDS)
    for strategy in ("cma", "sep_cma", "nes"):
        s = train(_cfg(root, model_dir, f"flat-{strategy}", strategy=strategy, reward=f"{root}/rw.py:constant"))
        metrics = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        assert all(r["flat_fitness"] for r in metrics if "fitness_mean" in r)
        final = json.loads((Path(s["run_dir"]) / "adapters" / "final" / "essa_genome.json").read_text())
        assert not any(final["offset"]), strategy


def test_every_sample_is_scored(tiny_engine_parts, tmp_path, monkeypatch):
    root, model_dir = tiny_engine_parts
    (root / "rw.py").write_text(REWARDS)
    count = tmp_path / "count.jsonl"
    monkeypatch.setenv("ESSA_TEST_COUNT_FILE", str(count))
    train(_cfg(root, model_dir, "samples", generations=1, reward=f"{root}/rw.py:counting", val_metric="accuracy",
               generation={"max_new_tokens": 5, "num_samples": 3, "temperature": 1.0}))
    calls = [json.loads(x) for x in count.read_text().splitlines()]
    assert calls == [4 * 2 * 3]  # popsize x batch x samples, in one call


def test_sigma0_auto_in_a_run_is_logged(tiny_engine_parts):
    root, model_dir = tiny_engine_parts
    (root / "rw.py").write_text(REWARDS)
    s = train(_cfg(root, model_dir, "auto", generations=1, sigma0="auto", sigma_target_kl=0.01,
                   reward=f"{root}/rw.py:counting"))
    cal = json.loads((Path(s["run_dir"]) / "calibration.json").read_text())
    metrics = [json.loads(x) for x in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["sigma"] == pytest.approx(cal["sigma0"])
    assert cal["target_kl"] == 0.01 and cal["measurements"]


@pytest.mark.real
def test_default_exploration_moves_the_real_model(real_model_name, tmp_path):
    """SmolLM2-135M with an SFT-like adapter (PEFT's A init, small trained-looking B): with the default
    exploration (balanced genome, sigma0 auto at the default target), at least half of 8 candidates'
    greedy completions differ from the SFT adapter's on 4 prompts x 32 tokens."""
    from peft import LoraConfig, get_peft_model

    from essa.explore import DEFAULT_TARGET_KL

    model, tok = load_model(real_model_name, device="cpu", dtype="float32")
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.004)
    pm.save_pretrained(tmp_path / "sft")
    model, tok = load_model(real_model_name, device="cpu", dtype="float32")
    eng = PopulationEngine(model, tok, load_genome(tmp_path / "sft"))
    from essa.tasks import get_task, load_rows

    task = get_task("ifeval")
    rows = load_rows(task, "rl")[:4]
    ids = chat_prompts(tok, [r["prompt"] for r in rows], task.system_prompt)
    probe = MovementProbe(eng, ids, n_candidates=4, max_new_tokens=32, seed=0)
    sigma, _ = calibrate_sigma(probe, DEFAULT_TARGET_KL)
    X = sigma * np.random.default_rng(1).standard_normal((8, eng.genome.dimension))
    out = eng.generate(ids, X, SamplingConfig(max_new_tokens=32))
    differs = sum(any(out[c][p][0].token_ids != probe.completions[p] for p in range(4)) for c in range(8))
    assert differs >= 4, (sigma, differs)
