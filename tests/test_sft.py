"""SFT warm start: response-only masking, adapter output, errors, and a short real-model run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from essa import EssaError
from essa.sft import IGNORE_INDEX, SFTConfig, collate, encode_example, encode_rows, response_loss, response_of, run_sft
from essa.tasks import MATH_SYSTEM_PROMPT, get_task, load_rows


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from essa.models import load_tokenizer
    return load_tokenizer(tiny_model_dir)


def _cfg(model, out, **kw):
    base = dict(model=model, output_dir=str(out), max_steps=2, batch_size=4, grad_accum=1, max_length=256,
                limit=8, progress=False)
    return SFTConfig(**{**base, **kw})


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


PAIRS = [{"prompt": f"What is {i} + {i}?", "response": f"{i} + {i} = {2 * i}. \\boxed{{{2 * i}}}"} for i in range(8)]


def test_config_fields_all_documented():
    from dataclasses import fields
    for f in fields(SFTConfig):
        assert f.metadata.get("help"), f"SFTConfig.{f.name} has no help string"
    assert SFTConfig().target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"] and SFTConfig().rank == 8


def test_response_only_masking(tok):
    prompt, response = "Tom has 3 apples and buys 4 more. How many?", "3 + 4 = 7.\nThe final answer is \\boxed{7}."
    ex = encode_example(tok, prompt, response, MATH_SYSTEM_PROMPT, max_length=512)
    gen_prompt = tok.apply_chat_template(
        [{"role": "system", "content": MATH_SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
        tokenize=False, add_generation_prompt=True)
    p_ids = tok(gen_prompt, add_special_tokens=False)["input_ids"]
    n = len(p_ids)
    assert ex["input_ids"][:n] == p_ids                       # the inference prompt is a prefix
    assert ex["labels"][:n] == [IGNORE_INDEX] * n              # ... and is not trained on
    assert all(x != IGNORE_INDEX for x in ex["labels"][n:])
    assert ex["labels"][n:] == ex["input_ids"][n:]
    assert tok.decode(ex["labels"][n:]) == response + tok.eos_token  # response + end of turn, nothing else
    short = encode_example(tok, prompt, response, MATH_SYSTEM_PROMPT, max_length=n + 3)
    assert len(short["input_ids"]) == n + 3 and short["labels"][n:] == ex["labels"][n:n + 3]


def test_task_targets_and_collate(tok):
    task = get_task("gsm8k")
    rows = load_rows(task, task.sft_split, limit=3)
    assert len(load_rows(task, task.sft_split)) == 1495
    examples, dropped = encode_rows(tok, rows, task, 512)
    assert dropped == 0 and len(examples) == 3
    text = tok.decode([x for x in examples[0]["labels"] if x != IGNORE_INDEX])
    assert text == task.sft_target(rows[0]) + tok.eos_token and "\\boxed{" in text
    batch = collate(examples, tok.pad_token_id)
    lengths = [len(e["input_ids"]) for e in examples]
    for i, k in enumerate(lengths):  # right padding
        assert batch["attention_mask"][i, :k].all() and not batch["attention_mask"][i, k:].any()
        assert (batch["labels"][i, k:] == IGNORE_INDEX).all()
    assert response_of({"prompt": "q", "response": "r"}, task) == "r"


def test_run_sft_tiny_writes_loadable_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from essa.genome import load_genome

    out = tmp_path / "sft"
    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert run_sft(_cfg(tiny_model_dir, out, data=data, lr=1e-3)) == out
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "essa_sft_config.json", "sft_log.jsonl", "tb"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind
    meta = json.loads((out / "essa_sft_config.json").read_text())
    assert meta["config"]["rank"] == 8 and meta["rows"] == 8 and meta["steps"] == 2
    assert meta["final_loss"] > 0 and meta["wall_time_s"] > 0
    log = [json.loads(line) for line in (out / "sft_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and {"loss", "lr", "tokens", "elapsed"} <= set(log[0])

    saved = load_file(str(out / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in saved.items())  # it trained
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(out))
    state = model.state_dict()
    for key, value in saved.items():
        loaded = state[key.replace(".weight", ".default.weight")]
        assert torch.equal(loaded, value)
    genome = load_genome(out)
    assert genome.dimension == 2 * 4 * 2 * 8  # tiny llama: 2 layers x q/k/v/o x 2 factors x r


def test_grad_accum_and_checkpointing_match_one_big_batch(tiny_model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    runs = {"big": dict(batch_size=4, grad_accum=1), "accum": dict(batch_size=2, grad_accum=2),
            "ckpt": dict(batch_size=2, grad_accum=2, gradient_checkpointing=True)}
    weights = {}
    for name, kw in runs.items():
        out = run_sft(_cfg(tiny_model_dir, tmp_path / name, data=data, lr=1e-3, tensorboard=False, **kw))
        weights[name] = load_file(str(out / "adapter_model.safetensors"))
    for name in ("accum", "ckpt"):  # same token-mean loss, so the same update up to float error
        for key, value in weights["big"].items():
            torch.testing.assert_close(weights[name][key], value, atol=1e-6, rtol=1e-4)


def test_refuses_to_overwrite(tiny_model_dir, tmp_path):
    out = tmp_path / "sft"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    for overwrite in (False, True):  # a folder that is not an essa sft adapter is never replaced
        with pytest.raises(EssaError, match="holds no essa sft adapter"):
            run_sft(_cfg(tiny_model_dir, out, overwrite=overwrite))
    assert (out / "keep.txt").exists()
    data = _write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    adapter = tmp_path / "adapter"
    run_sft(_cfg(tiny_model_dir, adapter, max_steps=1, data=data))
    with pytest.raises(EssaError, match="overwrite"):
        run_sft(_cfg(tiny_model_dir, adapter, max_steps=1, data=data))
    (adapter / "mine.txt").write_text("x")
    run_sft(_cfg(tiny_model_dir, adapter, max_steps=1, overwrite=True, data=data))
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "mine.txt").exists()


def test_crash_leaves_nothing(tiny_model_dir, tmp_path, monkeypatch):
    import essa.sft

    def boom(*a, **k):
        raise RuntimeError("boom")
    monkeypatch.setattr(essa.sft, "response_loss", boom)
    with pytest.raises(RuntimeError):
        run_sft(_cfg(tiny_model_dir, tmp_path / "sft", data=_write_jsonl(tmp_path / "p.jsonl", PAIRS)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]


def test_errors(tiny_model_dir, tmp_path):
    with pytest.raises(EssaError, match="unknown task"):
        run_sft(_cfg(tiny_model_dir, tmp_path / "a", task="nope"))
    with pytest.raises(EssaError, match="does not exist"):
        run_sft(_cfg(tiny_model_dir, tmp_path / "b", data=str(tmp_path / "missing.jsonl")))
    with pytest.raises(EssaError, match=r"match no linear layer.*q_proj"):
        run_sft(_cfg(tiny_model_dir, tmp_path / "c", target_modules=["q_proj", "query"],
                     data=_write_jsonl(tmp_path / "p.jsonl", PAIRS)))
    prompts_only = _write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}])
    with pytest.raises(EssaError, match="response"):
        run_sft(_cfg(tiny_model_dir, tmp_path / "d", data=prompts_only))
    no_target = type("T", (), {"name": "custom", "sft_target": None})()
    with pytest.raises(EssaError, match="no reference responses"):
        response_of({"prompt": "hi"}, no_target)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


@pytest.mark.real
def test_real_sft_lowers_loss_and_genome_roundtrips(real_model_name, tmp_path):
    from essa.genome import factors, load_genome
    from essa.models import attach_adapter, load_model

    out = tmp_path / "sft"
    # 2 GSM8K SFT rows, 4 steps of batch 2 (4 epochs) at a constant lr 2e-3: the drop is unmistakable.
    # (Kept tiny: a step costs ~3 s on 2 free CPU cores, several times more on a busy machine.)
    cfg = SFTConfig(model=real_model_name, output_dir=str(out), max_steps=4, batch_size=2, grad_accum=1,
                    max_length=256, limit=2, lr=2e-3, scheduler="constant", warmup_ratio=0.0, progress=False,
                    tensorboard=False)
    run_sft(cfg)

    model, tok = load_model(real_model_name, device="cpu")
    tok.padding_side = "right"
    task = get_task("gsm8k")
    examples, _ = encode_rows(tok, load_rows(task, task.sft_split, limit=2), task, 256)
    batch = collate(examples, tok.pad_token_id)

    def mean_loss(m):
        with torch.no_grad():
            total, n = response_loss(m, batch)
        return total.item() / n

    before = mean_loss(model)  # LoRA B starts at zero: the base model is the step-0 adapter
    after = mean_loss(attach_adapter(model, str(out)))
    print(f"response loss before {before:.4f} after {after:.4f}")
    assert after < 0.8 * before, (before, after)

    genome = load_genome(out)
    assert genome.dimension == 1920  # 30 layers x 4 modules x 2 factors x 8
    saved = load_file(str(out / "adapter_model.safetensors"))
    rebuilt = factors(genome, torch.zeros(genome.dimension))
    for name, (A, B) in rebuilt.items():
        A0, B0 = (saved[f"{genome.key_prefix}{name}.lora_{f}.weight"].float() for f in "AB")
        ref = B0 @ A0
        assert ((B @ A - ref).norm() / ref.norm()).item() <= 1e-5, name
