"""The paper's evaluations and tasks: answer checking, avg@k / pass@k, paper system prompts, user
benchmark files through the MATH checker, reward-model alignment on prompt-only data."""

import json
import math
from pathlib import Path

import pytest

from essa.cli import main
from essa.evaluate import paired_bootstrap, pass_at_k, sampled_metrics
from essa.stopping import Completion
from essa.tasks import data_path, get_task, load_rows, read_jsonl
from essa.tasks.math import extract_number, gsm8k_example, gsm8k_reward, math_reward
from helpers import random_adapter


@pytest.mark.parametrize("text,value", [
    (r"\boxed{1{,}000}", 1000), (r"\boxed{1,\!000}", 1000), (r"\boxed{1\,000}", 1000),
    (r"\boxed{1{,}234{,}567}", 1234567), (r"so she lost \boxed{-\$5}", -5), ("The answer is \u22125", -5),
    (r"\boxed{18 \text{ per 2 hours}}", 18), (r"\boxed{\$1,250.50}", 1250.5), (r"\boxed{12\%}", 12),
    (r"\boxed{2,\!500 \text{ dollars}}", 2500), ("#### 12,345", 12345), ("it costs 3 then 7", 7),
    ("1\u2009000 people", 1000),
])
def test_gsm8k_extraction_without_false_negatives(text, value):
    assert extract_number(text) == value
    assert gsm8k_reward([""], [text], [str(value)]) == [1.0]


def test_extractor_returns_every_gold_answer():
    n = 0
    for split in ("train", "test"):
        for rec in read_jsonl(data_path("gsm8k", f"{split}.jsonl")):
            assert extract_number(rec["answer"]) == float(gsm8k_example(rec).answer), rec["answer"][-60:]
            n += 1
    assert n == 7473 + 1319


def test_pass_at_k_unbiased_estimator():
    assert pass_at_k(8, 0, 1) == 0 and pass_at_k(8, 8, 4) == 1
    assert pass_at_k(8, 2, 1) == pytest.approx(2 / 8)
    assert pass_at_k(8, 2, 8) == 1.0
    # 1 - C(6,2)/C(8,2) = 1 - 15/28
    assert pass_at_k(8, 2, 2) == pytest.approx(1 - 15 / 28)


def test_paired_bootstrap_interval():
    a = [0.0, 1.0, 0.0, 1.0, 0.0] * 20
    up = paired_bootstrap(a, [1.0] * 100)  # every 0 became 1: +0.6, certain
    assert up["diff"] == 0.6 and up["ci95"][0] > 0.4 and up["significant"] and up["n"] == 100
    same = paired_bootstrap(a, a)
    assert same["diff"] == 0 and same["ci95"] == [0, 0] and not same["significant"]
    swapped = paired_bootstrap(a, a[1:] + a[:1])  # as many wins as losses: the interval spans 0
    assert swapped["ci95"][0] < 0 < swapped["ci95"][1] and not swapped["significant"]
    assert paired_bootstrap([1.0, math.nan, 0.0], [1.0, 0.0, 1.0])["n"] == 2  # a pair with an invalid value is left out
    b = [1.0, 1.0, 0.0, 0.0, 1.0] * 20
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)  # seeded: the same interval twice
    assert paired_bootstrap(a, b, seed=3)["ci95"] != paired_bootstrap(a, b, seed=4)["ci95"]
    # a statistic over rows (a ratio, as IFEval's instruction-level accuracy): sums of two columns
    ratio = lambda d, i: d["hit"][i].sum() / d["n"][i].sum()  # noqa: E731
    import numpy as np
    da = {"hit": np.array([1.0, 0.0] * 50), "n": np.array([2.0, 1.0] * 50)}
    db = {"hit": np.array([2.0, 1.0] * 50), "n": np.array([2.0, 1.0] * 50)}
    r = paired_bootstrap(da, db, statistic=ratio)
    assert r["n"] == 100 and abs(r["diff"] - (1 - 1 / 3)) < 1e-3 and r["significant"]


def test_sampled_metrics_avg_and_pass():
    task = get_task("gsm8k")
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]
    c = lambda t: Completion(text=t, token_ids=[], finish_reason="eos")  # noqa: E731
    per_prompt = [[c(r"\boxed{1}"), c(r"\boxed{3}"), c(r"\boxed{1}"), c(r"\boxed{0}")],
                  [c(r"\boxed{5}")] * 4]
    m = sampled_metrics(task, rows, per_prompt)
    assert m["avg@4"] == pytest.approx((2 / 4) / 2)
    assert m["pass@1"] == pytest.approx(0.25) and m["pass@4"] == pytest.approx(0.5)
    assert m["pass@2"] == pytest.approx((1 - 1 / 6) / 2)


def test_ifeval_sampled_metrics_report_all_four():
    task = get_task("ifeval")
    rows = load_rows(task, "test", limit=2)
    c = lambda t: Completion(text=t, token_ids=[], finish_reason="eos")  # noqa: E731
    m = sampled_metrics(task, rows, [[c("hello"), c("HELLO WORLD")]] * 2)
    assert {"avg@2", "avg@2/inst_loose", "avg@2/prompt_loose", "avg@2/inst_strict", "pass@1", "pass@2"} <= set(m)


def test_paper_system_prompts():
    assert get_task("gsm8k").system_prompt == "Please reason step by step and place your final answer in \\boxed{}."
    assert get_task("math").system_prompt == get_task("gsm8k").system_prompt
    assert get_task("ifeval").system_prompt == "You are a helpful, honest, and concise assistant."


def test_user_benchmark_file_goes_through_the_math_checker(tmp_path):
    path = tmp_path / "aime.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"problem": "Find x.", "answer": 204}, {"question": "Compute y.", "answer": "\\frac{1}{2}"}]) + "\n")
    rows = load_rows(get_task("math"), str(path))
    assert [r["prompt"] for r in rows] == ["Find x.", "Compute y."] and rows[0]["answer"] == "204"
    assert math_reward([r["prompt"] for r in rows], [r"\boxed{204}", r"\boxed{0.5}"],
                       [r["answer"] for r in rows]) == [1.0, 1.0]


def test_eval_cli_reports_avg_and_pass_at_k(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "e.jsonl"
    assert main(["eval", "--model", tiny_model_dir, "--task", "gsm8k", "--limit", "3", "--max-new-tokens", "4",
                 "--num-samples", "4", "--temperature", "1.0", "--device", "cpu", "--output", str(out),
                 "--reward", "gsm8k"]) == 0
    text = capsys.readouterr().out
    summary = json.loads(text[text.index("{"):])
    assert {"accuracy", "avg@4", "pass@1", "pass@2", "pass@4", "sampling", "system_prompt", "reward_mean"} <= set(summary)
    assert summary["reward_mean"] == summary["accuracy"]  # gsm8k's reward over the greedy completions
    assert summary["system_prompt"] == get_task("gsm8k").system_prompt
    assert 0 <= summary["pass@1"] <= summary["pass@4"] <= 1


def test_reward_model_alignment_on_prompt_only_data(tiny_model_dir, tmp_path):
    """The paper's HelpSteer2 + ArmoRM setting, in miniature: prompt-only rows, a (tiny random) reward
    model, validation and test = the mean reward being optimised."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from essa.config import from_dict
    from essa.models import load_model, load_tokenizer
    from essa.trainer import TrainConfig, train

    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    prompts = [{"prompt": p} for p in ["Describe rain.", "Give advice on sleep.", "Explain tides.", "Write a toast.",
                                       "Plan a picnic.", "Summarise a film.", "Name three birds.", "Why is sky blue?"]]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts[:3]))
    model, _ = load_model(tiny_model_dir, device="cpu", dtype="float32")
    random_adapter(model, tmp_path / "sft", rank=4, targets=("q_proj", "v_proj"))
    cfg = from_dict(TrainConfig, {
        "model": tiny_model_dir, "adapter": str(tmp_path / "sft"), "task": "prompts",
        "train_data": str(tmp_path / "train.jsonl"), "test_data": str(tmp_path / "test.jsonl"),
        "reward": f"reward_model:{tmp_path / 'rm'}", "reward_options": {"batch_size": 4, "score_head": "logits:0"},
        "generations": 2, "popsize": 4, "sigma0": 0.3, "batch_size": 2, "val_size": 3, "eval_every": 1,
        "generation": {"max_new_tokens": 4}, "output_dir": str(tmp_path / "run"), "device": "cpu",
        "tensorboard": False})
    summary = train(cfg)
    assert summary["val_metric"] == "reward" and summary["test_metric"] == "reward"
    assert summary["system_prompt"] == "You are a helpful, honest, and concise assistant."
    metrics = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    vals = [m["val_mean"] for m in metrics if "val_mean" in m]
    assert len(vals) == 3 and all(math.isfinite(v) for v in vals) and len(set(vals)) > 1
    assert all(math.isfinite(summary[f"test_{k}"]) for k in ("sft", "best", "final"))


def test_prompts_task_needs_data_and_reward(tmp_path):
    from essa import EssaError
    from essa.config import from_dict
    from essa.trainer import TrainConfig, task_setup

    with pytest.raises(EssaError, match="no reward of its own"):
        task_setup(from_dict(TrainConfig, {"adapter": "x", "task": "prompts"}))
    with pytest.raises(EssaError, match="train_data"):
        task_setup(from_dict(TrainConfig, {"adapter": "x", "task": "prompts", "reward": "gsm8k"}))


def test_train_final_test_reports_avg_and_pass_at_k(tiny_model_dir, tmp_path):
    from essa.config import from_dict
    from essa.models import load_model
    from essa.trainer import TrainConfig, train

    model, _ = load_model(tiny_model_dir, device="cpu", dtype="float32")
    random_adapter(model, tmp_path / "sft", rank=4, targets=("q_proj", "v_proj"))
    s = train(from_dict(TrainConfig, {
        "model": tiny_model_dir, "adapter": str(tmp_path / "sft"), "task": "gsm8k", "generations": 1, "popsize": 4,
        "sigma0": 0.3, "batch_size": 2, "val_size": 2, "test_limit": 2, "test_num_samples": 2,
        "generation": {"max_new_tokens": 3}, "output_dir": str(tmp_path / "run"), "device": "cpu",
        "tensorboard": False}))
    for name in ("sft", "best", "final"):
        assert {f"test_{name}", f"test_{name}_avg@2", f"test_{name}_pass@1", f"test_{name}_pass@2"} <= set(s)


def test_reward_model_score_head_option(tiny_model_dir, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from essa import EssaError
    from essa.models import load_tokenizer
    from essa.rewards import reward_model_reward

    tok = load_tokenizer(tiny_model_dir)
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=2, pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    first = reward_model_reward(str(tmp_path / "rm"), device="cpu")(["a", "b"], ["x", "y"])
    second = reward_model_reward(str(tmp_path / "rm"), device="cpu", score_head="logits:1")(["a", "b"], ["x", "y"])
    assert first != second and all(isinstance(v, float) for v in first + second)
    with pytest.raises(EssaError, match="no .score"):
        reward_model_reward(str(tmp_path / "rm"), device="cpu", score_head="score")(["a"], ["x"])
    with pytest.raises(EssaError, match="score_head"):
        reward_model_reward(str(tmp_path / "rm"), device="cpu", score_head="bogus")
