"""The TRL-shaped Python API on the tiny model: an HF `datasets.Dataset` (standard and conversational
prompts, extra columns passed to the reward), TRL-signature reward functions, train(), save_model()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset
from peft import PeftModel

from essa import ESSAConfig, EssaError, ESSATrainer
from essa.models import load_model
from helpers import tiny_sft_adapter

SEEN: list[dict] = []


def vowels(prompts, completions, target, **kwargs):
    """TRL signature: completions (text or messages) and the dataset's other columns as keyword lists."""
    SEEN.append({"prompts": prompts[:1], "completions": completions[:1], "target": target[:1]})
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch in t for ch in x) / max(1, len(x)) for x, t in zip(texts, target)]


def length(completions, **kwargs):
    return [-len(c[0]["content"] if isinstance(c, list) else c) / 100 for c in completions]


@pytest.fixture(scope="module")
def sft(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    tiny_sft_adapter(tiny_model_dir, root / "sft")
    cfg = json.loads((root / "sft" / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = tiny_model_dir
    (root / "sft" / "adapter_config.json").write_text(json.dumps(cfg))
    return root


def _args(root, out, **over):
    return ESSAConfig(**{"output_dir": str(root / out), "generations": 2, "popsize": 4, "sigma0": 0.5, "batch_size": 3,
                         "eval_every": 1, "generation": {"max_new_tokens": 6}, "device": "cpu", "tensorboard": False, **over})


def test_trl_shaped_training_with_a_conversational_dataset(sft):
    from essa.sampling import SamplingConfig

    SEEN.clear()
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {w}."}], "target": w}
            for w in ("aeiou", "yes", "no", "maybe", "often", "rarely", "always", "never")]
    train_ds, eval_ds = Dataset.from_list(rows[:6]), Dataset.from_list(rows[6:])
    args = _args(sft, "conv", generation=SamplingConfig(max_new_tokens=6), reward_weights=[1.0, 0.5])
    trainer = ESSATrainer(model=str(sft / "sft"), reward_funcs=[vowels, length], train_dataset=train_ds,
                          eval_dataset=eval_ds, args=args)
    summary = trainer.train()
    assert summary["generations"] == 2 and summary["val_metric"] == "reward"
    assert summary["selection_split"].startswith("2 rows")                       # the eval_dataset, not a carve-out
    assert summary["system_prompt"] == "Be brief."                                # taken from the conversation
    call = SEEN[0]
    assert call["prompts"][0][-1]["role"] == "user" and call["completions"][0][0]["role"] == "assistant"
    assert call["target"][0] in {r["target"] for r in rows}                       # extra columns reach the reward
    with pytest.raises(EssaError, match="never replaced"):  # the user's SFT adapter is not an essa export
        trainer.save_model(str(sft / "sft"))
    out = trainer.save_model(str(sft / "saved"))
    assert trainer.save_model(str(out)) == out  # an earlier export may be replaced
    base, _ = load_model(json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"], device="cpu")
    assert isinstance(PeftModel.from_pretrained(base, str(out)), PeftModel)


def test_standard_prompts_carve_validation_and_resume(sft):
    SEEN.clear()
    ds = Dataset.from_list([{"prompt": f"Count to {i}.", "target": "aeiou"} for i in range(10)])
    trainer = ESSATrainer(model=str(sft / "sft"), reward_funcs=vowels, train_dataset=ds, args=_args(sft, "std", val_size=3))
    s = trainer.train()
    assert s["selection_split"].startswith("3 rows") and isinstance(SEEN[0]["completions"][0], str)
    again = ESSATrainer(model=str(sft / "sft"), reward_funcs=vowels, train_dataset=ds, args=_args(sft, "std", val_size=3))
    assert again.train(resume_from_checkpoint=True)["best_val"] == s["best_val"]   # a finished run resumes to the same end


def test_in_memory_rewards_score_on_ray_workers(sft):
    """The API's reward functions travel to Ray workers (cloudpickle; a function defined in a script goes by
    value) and give the in-process run's results exactly."""
    def vowel_share(completions, **kwargs):  # defined here: not importable by a worker, pickled by value
        return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]

    ds = Dataset.from_list([{"prompt": f"Spell {w}.", "target": w} for w in ("one", "two", "three", "four", "five", "six")])
    runs = {}
    for workers in (0, 1):
        trainer = ESSATrainer(model=str(sft / "sft"), reward_funcs=vowel_share, train_dataset=ds,
                              args=_args(sft, f"ray-{workers}", val_size=2, distributed={"workers": workers}))
        trainer.train()
        runs[workers] = [(r["generation"], r.get("fitness_mean"), r.get("val_mean"))
                         for r in map(json.loads, (sft / f"ray-{workers}" / "metrics.jsonl").read_text().splitlines())]
    assert runs[1] == runs[0] and len(runs[0]) == 3


def test_bad_api_input_is_one_line(sft):
    ds = Dataset.from_list([{"question": "no prompt"}])
    with pytest.raises(EssaError, match="row 0 has no 'prompt'"):
        ESSATrainer(model=str(sft / "sft"), reward_funcs=vowels, train_dataset=ds, args=_args(sft, "bad"))
    with pytest.raises(EssaError, match="reward_weights"):
        ESSATrainer(model=str(sft / "sft"), reward_funcs=[vowels], train_dataset=Dataset.from_list([{"prompt": "x"}]),
                    args=_args(sft, "bad", reward_weights=[1.0, 2.0]))
    with pytest.raises(EssaError, match="save_pretrained"):
        ESSATrainer(model=object(), reward_funcs=vowels, train_dataset=ds, args=_args(sft, "bad"))
    assert not Path(sft / "bad").exists()
