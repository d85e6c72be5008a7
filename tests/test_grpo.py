"""GRPO baseline (TRL) and the equal-budget ESSA-vs-GRPO comparison, on the tiny model (CPU)."""

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("trl", reason="the GRPO baseline needs TRL: pip install 'essa[grpo]'")

from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from essa import EssaError  # noqa: E402
from essa.cli import main  # noqa: E402
from essa.compare import build_configs, run_compare  # noqa: E402
from essa.config import from_dict  # noqa: E402
from essa.grpo import GRPORunConfig, run_grpo  # noqa: E402
from essa.models import load_model  # noqa: E402
from helpers import random_adapter

REWARD = '''
def vowel_fraction(prompts, completions, **columns):
    """A reward that varies between completions of a random model: the share of vowels."""
    assert all(isinstance(p, str) for p in prompts) and all(isinstance(c, str) for c in completions)
    assert "answer" in columns and len(columns["answer"]) == len(completions)
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]
'''


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    model, _ = load_model(tiny_model_dir, device="cpu", dtype="float32")
    random_adapter(model, root / "sft", rank=4, targets=("q_proj", "v_proj"))
    (root / "sft" / "essa_sft_config.json").write_text(json.dumps({"wall_time_s": 12.5}))
    (root / "rewards_for_tests.py").write_text(REWARD)
    return root, tiny_model_dir


def shared(root, model, **over):
    cfg = {"model": model, "adapter": str(root / "sft"), "task": "gsm8k",
           "reward": f"{root}/rewards_for_tests.py:vowel_fraction", "val_size": 3, "test_limit": 2,
           "generation": {"max_new_tokens": 6}, "device": "cpu", "seed": 1}
    cfg.update(over)
    return cfg


GRPO_SMALL = {"num_generations": 2, "per_device_batch": 4, "grad_accum": 1, "updates_per_rollout": 1, "lr": 1e-3}


def metrics(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_grpo_trains_validates_and_exports(setup, tmp_path):
    root, model = setup
    out = root / "grpo"
    cfg = {**shared(root, model), **GRPO_SMALL, "max_steps": 2, "eval_every_steps": 1, "save_every_steps": 2,
           "output_dir": str(out)}
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["grpo", "--config", str(tmp_path / "grpo.yaml")]) == 0

    rows = metrics(out)
    assert [r["generation"] for r in rows] == [0, 1, 2]
    assert all("val_mean" in r for r in rows)  # start + every step
    assert all(0 <= r["reward_mean"] <= 1 and "loss" in r for r in rows[1:])
    assert 0 < rows[1]["tokens"] < rows[2]["tokens"] and rows[1]["wall_seconds"] < rows[2]["wall_seconds"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["tokens_generated"] == rows[-1]["tokens"]
    assert {"best_val", "test_sft", "test_best", "test_final", "test_n"} <= set(summary)
    gain = summary["test_final_minus_sft"]  # a reward metric is a mean over rows: paired interval, as essa train
    assert gain["n"] == 2 and abs(summary["test_final"] - summary["test_sft"] - gain["diff"]) < 1e-3
    assert (out / "checkpoints" / "checkpoint-2").is_dir()

    # the final adapter is a normal PEFT adapter: same modules and rank as the SFT one, trained further
    final, sft = out / "adapters" / "final", root / "sft"
    m, _ = load_model(model, device="cpu", dtype="float32")
    PeftModel.from_pretrained(m, final)
    a, b = json.loads((final / "adapter_config.json").read_text()), json.loads((sft / "adapter_config.json").read_text())
    assert a["r"] == b["r"] and sorted(a["target_modules"]) == sorted(b["target_modules"])
    wa, wb = load_file(str(final / "adapter_model.safetensors")), load_file(str(sft / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and any(not torch.equal(wa[k], wb[k]) for k in wa)
    assert (out / "adapters" / "best" / "essa_grpo.json").exists()

    # validation/test use essa's own evaluator: the SFT test completions equal `build_engine` + greedy decode
    from essa.engines import build_engine
    from essa.evaluate import generate_and_score
    from essa.tasks import get_task, load_rows

    task = get_task("gsm8k")
    test_rows = load_rows(task, task.test_split, limit=2)
    engine = build_engine(model, str(sft), device="cpu")
    from essa.sampling import SamplingConfig

    ((_, comps),) = generate_and_score(engine, task, test_rows, None, SamplingConfig(max_new_tokens=6), task.system_prompt)
    logged = [json.loads(x)["completion"] for x in (out / "test-sft.jsonl").read_text().splitlines()]
    assert logged == [c.text for c in comps]


def test_grpo_stops_at_the_time_budget(setup):
    root, model = setup
    summary = run_grpo(from_dict(GRPORunConfig, {**shared(root, model, test_limit=0), **GRPO_SMALL, "max_steps": 50,
                                                 "max_minutes": 1e-5, "eval_every_steps": None, "save_every_steps": None,
                                                 "gradient_checkpointing": False, "output_dir": str(root / "budget")}))
    assert summary["steps"] == 1 and summary["stopped_by_budget"]
    rows = metrics(root / "budget")
    assert [r["generation"] for r in rows if "val_mean" in r] == [0, 1]  # start, and the end of the budget


def test_compare_runs_both_methods_for_the_same_budget(setup):
    root, model = setup
    out = root / "cmp"
    data = {**shared(root, model), "tensorboard": False, "eval_every_seconds": 0.0, "output_dir": str(out),
            "essa": {"popsize": 4, "generations": 2, "batch_size": 2, "sigma0": 0.5},
            "grpo": {**GRPO_SMALL, "per_device_batch": 2, "max_steps": 2, "save_every_steps": None,
                     "gradient_checkpointing": False}}
    report = run_compare(data, budget_minutes=5)
    assert report["budget_minutes"] == 5 and report["sft"]["wall_seconds"] == 12.5
    assert report["threshold_source"].startswith("lower")
    for name, iters in (("essa", 2), ("grpo", 2)):
        r = report["methods"][name]
        assert r["iterations"] == iters and r["validations"] == 3  # start + every iteration (eval_every_seconds 0)
        assert r["time_to_threshold_seconds"] is not None and r["tokens_generated"] > 0
        assert {"best_val", "test_best", "test_final", "final_val", "tokens_to_threshold"} <= set(r)
        assert r["peak_memory_gb"] > 0 and r["peak_memory_kind"].startswith("CPU")
        assert r["training_wall_seconds"] < 5 * 60
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["methods"].keys() == {"essa", "grpo"}
    assert (out / "comparison.png").stat().st_size > 1000
    # same evaluator and rows on both sides: the SFT adapter's test completions are identical
    assert (out / "essa" / "test-sft.jsonl").read_text() == (out / "grpo" / "test-sft.jsonl").read_text()
    with pytest.raises(EssaError, match="already holds a comparison"):
        run_compare(data, budget_minutes=5)


def test_compare_config_errors(setup):
    root, model = setup
    base = {**shared(root, model), "output_dir": str(root / "never")}
    with pytest.raises(EssaError, match="budget"):
        build_configs(base)
    with pytest.raises(EssaError, match="val_size differs"):
        build_configs({**base, "grpo": {"val_size": 5}}, 1)
    with pytest.raises(EssaError, match="generation.max_new_tokens differs"):
        build_configs({**base, "essa": {"generation": {"max_new_tokens": 9}}}, 1)
    with pytest.raises(EssaError, match="unknown config key 'popsze'"):
        build_configs({**base, "popsze": 3}, 1)
    with pytest.raises(EssaError, match="set by essa compare"):
        build_configs({**base, "grpo": {"max_minutes": 3}}, 1)
    with pytest.raises(EssaError, match="multiple of num_generations"):
        build_configs({**base, "grpo": {"num_generations": 3}}, 1)
    _, essa_cfg, grpo_cfg = build_configs({**base, "alpha": 0.5, "lr": 2e-5,
                                           "essa": {"generation": {"temperature": 0.7}}}, 2)
    assert essa_cfg.generation.temperature == 0.7 and essa_cfg.generation.max_new_tokens == 6  # merged
    assert essa_cfg.alpha == 0.5 and grpo_cfg.lr == 2e-5 and essa_cfg.max_minutes == grpo_cfg.max_minutes == 2
    assert essa_cfg.eval_every_seconds == grpo_cfg.eval_every_seconds == 12.0  # budget / 10
