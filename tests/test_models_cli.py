"""Model resolution, data loaders and the `essa eval` / config CLI."""

import json

import pytest

from essa import EssaError
from essa.cli import main
from essa.models import cache_dir, load_model, resolve_model
from essa.tasks import get_task, load_rows, read_jsonl
from essa.tasks.math import extract_number, gsm8k_reward, last_boxed, math_reward


def test_unknown_model_lists_aliases():
    with pytest.raises(EssaError, match="smollm2-135m-instruct"):
        resolve_model("no-such-model")


def test_data_splits_and_records(tmp_path):
    gsm = get_task("gsm8k")
    sft, rl = load_rows(gsm, "sft"), load_rows(gsm, "rl")
    assert (len(sft), len(rl), len(load_rows(gsm, "test"))) == (1495, 5978, 1319)
    assert not {r["prompt"] for r in sft} & {r["prompt"] for r in rl}
    assert load_rows(gsm, "sft")[:3] == sft[:3]  # deterministic
    assert "<<" not in gsm.sft_target(sft[0]) and "\\boxed{" in gsm.sft_target(sft[0])
    assert len(load_rows(get_task("math500"), "test")) == 500
    # a local jsonl in the task's own format, and a broken one
    p = tmp_path / "mine.jsonl"
    p.write_text(json.dumps({"question": "1+1?", "answer": "two\n#### 2"}) + "\n")
    assert load_rows(gsm, str(p)) == [{"prompt": "1+1?", "answer": "2", "solution": "two"}]
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(EssaError, match="bad.jsonl:1"):
        read_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(EssaError, match="unknown task"):
        get_task("gsm9k")


def test_math_rewards():
    assert last_boxed("a \\boxed{\\frac{1}{2}} b \\boxed{x^{2}}") == "x^{2}"
    assert extract_number("so the total is $1,234.") == 1234
    assert extract_number("#### 7") == 7 and extract_number("no digits") is None
    assert gsm8k_reward([""] * 3, ["\\boxed{18}", "it is 18 dollars", "\\boxed{17} then 18"], answer=["18"] * 3) == [1.0, 1.0, 0.0]
    assert math_reward([""] * 3, ["\\boxed{\\frac12}", "\\boxed{0.5}", "0.5"], answer=["\\frac{1}{2}"] * 3) == [1.0, 1.0, 0.0]


def test_eval_cli_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "ev.jsonl"
    assert main(["eval", "--model", tiny_model_dir, "--task", "gsm8k", "--limit", "3", "--max-new-tokens", "5",
                 "--device", "cpu", "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 3 and 0 <= summary["accuracy"] <= 1
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 3 and {"prompt", "completion", "score", "answer"} <= set(lines[0])
    # bad input: one-line error, exit 2, nothing written
    assert main(["eval", "--model", tiny_model_dir, "--task", "gsm9k", "--output", str(tmp_path / "x.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("essa: error: unknown task") and err.count("\n") == 1
    assert not (tmp_path / "x.jsonl").exists()


def test_config_help_lists_every_field(capsys):
    assert main(["config-help", "train"]) == 0
    text = capsys.readouterr().out
    for key in ("popsize", "sigma0", "generation.max_new_tokens", "shared_batch", "val_size"):
        assert key in text


@pytest.mark.parametrize("argv", [[], ["sft"], ["genome", "info"], ["eval"], ["train"], ["report"],
                                  ["data", "ifeval-like"], ["grpo"], ["compare"], ["demo"], ["config-help"]])
def test_every_command_help_renders(argv, capsys):
    # argparse %-formats help strings: a bare '%' in a config docstring used to crash `essa eval --help`
    with pytest.raises(SystemExit) as e:
        main(argv + ["--help"])
    assert e.value.code == 0
    assert "usage: essa" in capsys.readouterr().out


@pytest.mark.real
def test_real_model_resolves_offline_and_chats(real_model_name):
    path = resolve_model(real_model_name)
    assert str(cache_dir()) in path
    model, tok = load_model(real_model_name, device="cpu", dtype="float32")
    assert model.config.num_hidden_layers == 30 and tok.pad_token is not None and tok.padding_side == "left"
    from essa.chat import chat_prompts
    from essa.engine import PopulationEngine
    from essa.sampling import SamplingConfig

    engine = PopulationEngine(model, tok)
    (reply,), = engine.generate(chat_prompts(tok, ["What is 2+3? Answer with a number."]), None,
                                SamplingConfig(max_new_tokens=16))
    assert "5" in reply[0].text


@pytest.mark.real
def test_real_model_eval_cli(real_model_name, tmp_path, capsys):
    out = tmp_path / "ev.jsonl"
    assert main(["eval", "--model", real_model_name, "--task", "gsm8k", "--limit", "8", "--max-new-tokens", "48",
                 "--device", "cpu", "--output", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 8 and summary["generated_tokens"] > 8
    assert len(out.read_text().splitlines()) == 8


def test_cli_flags_parse_like_yaml():
    from essa.cli import build_config, build_parser
    from essa.sft import SFTConfig

    args = build_parser().parse_args(["sft", "--lr", "2e-4", "--max-steps", "3", "--target-modules", "[q_proj, v_proj]",
                                      "--set", "rank=4"])
    cfg = build_config(SFTConfig, args)
    assert (cfg.lr, cfg.max_steps, cfg.target_modules, cfg.rank) == (2e-4, 3, ["q_proj", "v_proj"], 4)
    bad = build_parser().parse_args(["sft", "--rank", "eight"])
    with pytest.raises(EssaError, match="rank must be int"):
        build_config(SFTConfig, bad)


def test_shipped_configs_parse():
    from pathlib import Path

    from essa.config import from_dict as build
    from essa.config import load_yaml
    from essa.grpo import GRPORunConfig
    from essa.trainer import TrainConfig

    root = Path(__file__).resolve().parents[1] / "configs"
    for name in ("gsm8k-smollm2", "math-smollm2", "ifeval-smollm2"):
        assert build(TrainConfig, load_yaml(root / f"{name}.yaml")).adapter
    assert build(GRPORunConfig, load_yaml(root / "grpo-gsm8k.yaml")).lr == 1e-5
