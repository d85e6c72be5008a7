"""The ESSA loop on the tiny model: runs, logs, exports, reports, and resumes bit-identically."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from peft import PeftModel

from essa import EssaError
from essa.checkpoint import load_checkpoint
from essa.cli import main
from essa.config import from_dict
from essa.models import load_model
from essa.trainer import TrainConfig, train
from helpers import tiny_sft_adapter

REWARD = '''
def vowel_fraction(prompts, completions, **columns):
    """A reward that varies between candidates of a random model: the share of vowels."""
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]

def flaky(prompts, completions, **columns):
    out = [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]
    out[0] = None
    return out
'''


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    tiny_sft_adapter(tiny_model_dir, root / "sft")
    (root / "rewards_for_tests.py").write_text(REWARD)
    return root, tiny_model_dir


def config(root, model, out, **over):
    cfg = {"model": model, "adapter": str(root / "sft"), "task": "gsm8k", "reward": f"{root}/rewards_for_tests.py:vowel_fraction",
           "generations": 4, "popsize": 4, "sigma0": 0.5, "batch_size": 3, "val_size": 3, "test_limit": 2,
           "eval_every": 2, "generation": {"max_new_tokens": 6}, "output_dir": str(root / out), "device": "cpu",
           "tensorboard": False, "seed": 1}
    cfg.update(over)
    return cfg


def fitness_sequence(run_dir):
    lines = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["generation"], r["fitness_mean"], r["fitness_max"]) for r in lines if "fitness_mean" in r]


def test_train_runs_logs_exports_and_reports(setup):
    root, model = setup
    summary = train(from_dict(TrainConfig, config(root, model, "run", tensorboard=True)))
    run = Path(summary["run_dir"])
    seq = fitness_sequence(run)
    assert [g for g, _, _ in seq] == [1, 2, 3, 4]
    assert len({f for _, f, _ in seq}) > 1, "fitness should vary across generations"
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["generation"] == 0 and "val_mean" in metrics[0]
    assert sum("val_mean" in m for m in metrics) == 3  # start, gen 2, gen 4
    for key in ("fitness_std", "sigma", "tokens", "wall_seconds", "fitness_min"):
        assert key in metrics[-1]
    for name in ("best", "final"):
        adapter = run / "adapters" / name
        m, _ = load_model(model, device="cpu", dtype="float32")
        PeftModel.from_pretrained(m, adapter)  # loads as a normal PEFT adapter
    assert {"test_sft", "test_best", "test_final", "best_val"} <= set(summary)
    # the metric (a custom reward) is a mean over rows, so the test report has paired intervals of the differences
    for name in ("best", "final"):
        gain = summary[f"test_{name}_minus_sft"]
        assert gain["n"] == 2 and gain["ci95"][0] <= gain["diff"] <= gain["ci95"][1]
        assert abs(summary[f"test_{name}"] - summary["test_sft"] - gain["diff"]) < 1e-3
    assert (run / "samples.jsonl").exists() and list((run / "tb").iterdir())
    assert main(["report", str(run)]) == 0
    assert (run / "report.png").stat().st_size > 1000 and "| 4 |" in (run / "report.md").read_text()
    with pytest.raises(EssaError, match="--resume"):
        train(from_dict(TrainConfig, config(root, model, "run")))


def test_invalid_rewards_are_counted_and_scored_worst(setup):
    root, model = setup
    summary = train(from_dict(TrainConfig, config(root, model, "flaky", generations=1, test_limit=0,
                                                  reward=f"{root}/rewards_for_tests.py:flaky")))
    assert summary["invalid_rewards"] == 1  # the reward sees all rows of a generation in one call
    assert json.loads((Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()[-1])["invalid_rewards"] == 1


def test_config_errors_name_the_key(setup):
    root, model = setup
    with pytest.raises(EssaError, match="unknown config key 'popsze'.*valid keys"):
        from_dict(TrainConfig, {**config(root, model, "x"), "popsze": 3})
    with pytest.raises(EssaError, match="generation.max_new_tokens must be int"):
        from_dict(TrainConfig, config(root, model, "x", generation={"max_new_tokens": "many"}))
    with pytest.raises(EssaError, match="adapter"):
        from_dict(TrainConfig, {"task": "gsm8k"})


def test_sigkill_and_resume_reproduces_the_run(setup, tmp_path):
    root, model = setup
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    ref = train(from_dict(TrainConfig, config(root, model, "ref", generations=6, test_limit=0)))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config(root, model, "killed", generations=6, test_limit=0)))
    killed = root / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "essa.cli", "train", "--config", str(cfg_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (killed / "checkpoint.npz").exists() and load_checkpoint(killed)[0]["loop"]["generation"] >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    assert load_checkpoint(killed)[0]["loop"]["generation"] < 6
    assert main(["train", "--resume", str(killed)]) == 0
    assert fitness_sequence(killed) == fitness_sequence(ref["run_dir"])
    a = np.load(Path(ref["run_dir"]) / "checkpoint.npz")
    b = np.load(killed / "checkpoint.npz")
    assert np.array_equal(a["best_offset"], b["best_offset"])


ALWAYS_NONE = '''
def nothing(prompts, completions, **columns):
    return [None] * len(completions)
'''


@pytest.mark.parametrize("over,match", [
    ({"val_size": 0}, "val_size must be >= 1"), ({"val_size": -1}, "val_size must be >= 1"),
    ({"test_limit": -1}, "test_limit must be >= 0"), ({"generation": {"temperature": -1}}, "temperature must be >= 0"),
    ({"generation": {"num_samples": 0}}, "num_samples >= 1"), ({"generation": {"top_p": 0}}, "top_p must be in"),
    ({"sigma0": "big"}, "sigma0 must be"), ({"sigma0": -0.1}, "sigma0 must be"),
])
def test_out_of_range_settings_fail_with_one_line(setup, over, match):
    root, model = setup
    with pytest.raises(EssaError, match=match) as e:
        from_dict(TrainConfig, config(root, model, "bad", **over))
    assert "\n" not in str(e.value)


def test_generation_without_valid_reward_never_ranks(setup):
    root, model = setup
    (root / "none_reward.py").write_text(ALWAYS_NONE)
    s = train(from_dict(TrainConfig, config(root, model, "none", generations=2, test_limit=0, val_metric="accuracy",
                                            reward=f"{root}/none_reward.py:nothing")))
    meta, arrays = load_checkpoint(s["run_dir"])
    assert meta["loop"]["best_fitness"] == float("-inf") and not arrays["best_candidate"].any()
    final = json.loads((Path(s["run_dir"]) / "adapters" / "final" / "essa_genome.json").read_text())
    assert not any(final["offset"])  # the mean never moved


def test_run_directories_are_protected(setup, tmp_path):
    root, model = setup
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(EssaError, match="not empty"):
        train(from_dict(TrainConfig, config(root, model, "x", output_dir=str(other))))
    assert [p.name for p in other.iterdir()] == ["notes.txt"] and (other / "notes.txt").read_text() == "keep me"
    # one process per run directory
    from essa.files import lock_run_dir

    busy = tmp_path / "busy"
    busy.mkdir()
    held = lock_run_dir(busy)
    try:
        with pytest.raises(EssaError, match="in use"):
            train(from_dict(TrainConfig, config(root, model, "x", output_dir=str(busy))))
    finally:
        held.close()


def test_resume_writes_only_into_the_folder_given(setup, tmp_path, capsys):
    import shutil

    root, model = setup
    first = train(from_dict(TrainConfig, config(root, model, "moved-src", generations=2, test_limit=0)))
    src = Path(first["run_dir"])
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["generations"] = 3
    (moved / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--resume", str(moved)]) == 0
    assert [r[0] for r in fitness_sequence(moved)] == [1, 2, 3]
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before  # the original is untouched
    assert main(["train", "--resume", str(moved), "--set", "generations=5"]) == 2
    assert "drop --config/--set" in capsys.readouterr().err
