"""Reward-model fitness, user rewards, weighted combinations and reward specs."""

import math
import sys
import textwrap

import pytest

from essa import EssaError
from essa.rewards import combine_rewards, import_reward, resolve_reward, reward_model_reward

PROMPTS = ["What is 2+2?", "Name a colour.", "Write a haiku about rain.", "Say hi."]
COMPLETIONS = ["4", "Blue is a colour that many people like.", "Rain taps the roof\nsoft grey hours\npuddles hold the sky",
               "Hi!"]


@pytest.fixture(scope="module")
def rm_dirs(tmp_path_factory):
    """A tiny random LlamaForSequenceClassification (num_labels=1) saved twice: with the default model's
    tokenizer (which has a chat template) and with the same tokenizer minus its chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from essa.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      num_labels=1, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForSequenceClassification(cfg).eval()
    dirs = {}
    for name, template in (("chat", tok.chat_template), ("plain", None)):
        d = tmp_path_factory.mktemp(f"rm-{name}")
        model.save_pretrained(d)
        tok.chat_template = template
        tok.save_pretrained(d)
        dirs[name] = d
    return dirs


@pytest.mark.parametrize("kind", ["chat", "plain"])
def test_reward_model_scores_and_batch_invariance(rm_dirs, kind):
    one = reward_model_reward(str(rm_dirs[kind]), device="cpu", batch_size=1)
    three = reward_model_reward(str(rm_dirs[kind]), device="cpu", batch_size=3)
    assert bool(one.tokenizer.chat_template) == (kind == "chat")
    a = one(PROMPTS, COMPLETIONS)
    b = three(PROMPTS, COMPLETIONS, answer=["x"] * 4)
    assert len(a) == len(COMPLETIONS) and all(isinstance(v, float) and math.isfinite(v) for v in a)
    assert a == pytest.approx(b, abs=1e-4)
    assert len(set(round(v, 5) for v in a)) > 1  # the completions are actually read
    # the prompt matters too
    c = one(["Something else entirely."] * 4, COMPLETIONS)
    assert c != pytest.approx(a, abs=1e-6)


def test_reward_model_system_prompt_and_spec(rm_dirs):
    fn = resolve_reward(f"reward_model:{rm_dirs['chat']}", device="cpu", batch_size=2)
    base = fn(PROMPTS, COMPLETIONS)
    sys_fn = reward_model_reward(str(rm_dirs["chat"]), device="cpu", system_prompt="Be terse.")
    assert sys_fn(PROMPTS, COMPLETIONS) != pytest.approx(base, abs=1e-6)
    with pytest.raises(EssaError):
        reward_model_reward(str(rm_dirs["chat"] / "missing"), device="cpu")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        def length(prompts, completions, **_):
            return [float(len(c)) for c in completions]

        def has_x(prompts, completions, **_):
            return [1.0 if "x" in c else 0.0 for c in completions]

        def sometimes_none(prompts, completions, **_):
            return [None if c == "skip" else (float("nan") if c == "nan" else 1.0) for c in completions]

        NOT_CALLABLE = 3
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    yield tmp_path
    sys.modules.pop("my_rewards", None)


def test_import_reward_from_the_working_directory(user_module):
    fn = import_reward("my_rewards:length")
    assert fn(["p", "q"], ["ab", "abcd"]) == [2.0, 4.0]
    assert import_reward(f"{user_module / 'my_rewards.py'}:has_x")(["p"], ["x"]) == [1.0]


@pytest.mark.parametrize("spec,match", [
    ("no_such_module_abc:f", "cannot import reward module"),
    ("my_rewards:nope", "has no attribute"),
    ("my_rewards:NOT_CALLABLE", "not a function"),
    ("my_rewards", "module:function"),
    ("missing_file.py:f", "does not exist"),
])
def test_import_reward_errors(user_module, spec, match):
    with pytest.raises(EssaError, match=match):
        import_reward(spec)


def test_combine_with_weights_and_none_propagation(user_module):
    length, has_x, maybe = (import_reward(f"my_rewards:{n}") for n in ("length", "has_x", "sometimes_none"))
    comb = combine_rewards([(length, 0.5), (has_x, -2.0)])
    assert comb(["p"] * 3, ["ab", "xx", "abcx"], extra=[1, 2, 3]) == [1.0, -1.0, 0.0]
    comb = combine_rewards([(length, 1.0), (maybe, 1.0)])
    assert comb(["p"] * 4, ["ab", "skip", "nan", "xyz"]) == [3.0, None, None, 4.0]
    with pytest.raises(EssaError):
        combine_rewards([])
    with pytest.raises(EssaError):
        combine_rewards([(length, float("nan"))])
    bad = combine_rewards([(lambda p, c, **_: [1.0], 1.0)])
    with pytest.raises(EssaError, match="returned 1 values for 2"):
        bad(["p", "q"], ["a", "b"])


def test_resolve_reward_specs(user_module):
    from essa.tasks.ifeval import ifeval_reward
    from essa.tasks.math import gsm8k_reward

    assert resolve_reward("gsm8k") is gsm8k_reward
    assert resolve_reward("ifeval") is ifeval_reward
    assert resolve_reward(gsm8k_reward) is gsm8k_reward
    assert resolve_reward("my_rewards:length")(["p"], ["abc"]) == [3.0]
    comb = resolve_reward([{"reward": "gsm8k", "weight": 2.0}, {"reward": "my_rewards:has_x", "weight": 0.5}])
    assert comb(["q", "q"], ["\\boxed{4} x", "5"], answer=["4", "4"]) == [2.5, 0.0]
    assert resolve_reward([("my_rewards:length", 1), {"reward": "my_rewards:has_x"}])(["p"], ["x"]) == [2.0]
    for bad in ("nonsense", "", "reward_model:", [{"weight": 1}], 3):
        with pytest.raises(EssaError):
            resolve_reward(bad)
