"""Bad input, by class (config, data, adapter, model, reward, run directory, output paths): every case exits
with code 2, prints one `essa: error:` line and no traceback, and leaves every file that existed unchanged
(and, unless a case starts a run, adds none)."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from essa.cli import main
from helpers import tiny_sft_adapter

GOOD_ROWS = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(12)]

REWARDS = '''
import time

def vowels(prompts, completions, **columns):
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]

def hangs(prompts, completions, **columns):
    time.sleep(120)
    return [0.0] * len(completions)
'''


def _jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def ws(tiny_model_dir, tmp_path_factory):
    """A workspace of good and bad inputs, shared by every case (the cases must not change it)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    tiny_sft_adapter(tiny_model_dir, root / "sft")
    (root / "rewards_bad_inputs.py").write_text(REWARDS)
    _jsonl(root / "good.jsonl", GOOD_ROWS)
    base = {"model": tiny_model_dir, "adapter": str(root / "sft"), "task": "gsm8k", "train_data": str(root / "good.jsonl"),
            "reward": f"{root}/rewards_bad_inputs.py:vowels", "generations": 1, "popsize": 4, "sigma0": 0.5,
            "batch_size": 2, "val_size": 2, "test_limit": 0, "eval_every": 1, "generation": {"max_new_tokens": 4},
            "device": "cpu", "tensorboard": False, "output_dir": str(root / "finished")}
    (root / "base.yaml").write_text(yaml.safe_dump(base))
    grpo = {k: base[k] for k in ("model", "adapter", "task", "train_data", "reward", "val_size", "test_limit", "device")}
    (root / "grpo.yaml").write_text(yaml.safe_dump({**grpo, "max_steps": 1, "output_dir": str(root / "new-grpo")}))
    assert main(["train", "--config", str(root / "base.yaml")]) == 0  # a finished run
    # adapters the genome cannot represent, and damaged ones
    for name, change in (("dora", {"use_dora": True}), ("saved", {"modules_to_save": ["lm_head"]}),
                         ("bias", {"lora_bias": True})):
        shutil.copytree(root / "sft", root / name)
        cfg = json.loads((root / name / "adapter_config.json").read_text())
        (root / name / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    shutil.copytree(root / "sft", root / "embed")
    from safetensors.torch import load_file

    t = load_file(str(root / "sft" / "adapter_model.safetensors"))
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(4, 8)
    save_file(t, str(root / "embed" / "adapter_model.safetensors"))
    shutil.copytree(root / "sft", root / "pickled")
    (root / "pickled" / "adapter_model.safetensors").rename(root / "pickled" / "adapter_model.bin")
    shutil.copytree(root / "sft", root / "garbage-adapter")
    (root / "garbage-adapter" / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10)
    # models: a pickle-only folder, a remote-code folder, a folder without config.json
    shutil.copytree(tiny_model_dir, root / "model-copy")
    shutil.copytree(tiny_model_dir, root / "model-pickled")
    for f in (root / "model-pickled").glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    shutil.copytree(tiny_model_dir, root / "model-remote")
    mc = json.loads((root / "model-remote" / "config.json").read_text())
    mc.update(model_type="essa_custom_xyz", architectures=["CustomForCausalLM"],
              auto_map={"AutoConfig": "modeling_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (root / "model-remote" / "config.json").write_text(json.dumps(mc))
    (root / "model-noconfig").mkdir()
    (root / "model-noconfig" / "weights.safetensors").write_bytes(b"")
    # data files
    _jsonl(root / "no-prompt.jsonl", GOOD_ROWS[:5] + [{"question_text": "hi", "answer": "1"}] + GOOD_ROWS[5:])
    _jsonl(root / "no-answer.jsonl", [r if i % 4 else {"prompt": r["prompt"]} for i, r in enumerate(GOOD_ROWS)])
    _jsonl(root / "text-answer.jsonl", GOOD_ROWS[:3] + [{"prompt": "x?", "answer": "seven"}] + GOOD_ROWS[3:])
    _jsonl(root / "not-object.jsonl", GOOD_ROWS[:2] + ["[1, 2]"] + GOOD_ROWS[2:])
    _jsonl(root / "bad-json.jsonl", GOOD_ROWS[:2] + ['{"prompt": "cut'] + GOOD_ROWS[2:])
    _jsonl(root / "empty-prompt.jsonl", GOOD_ROWS[:2] + [{"prompt": "  ", "answer": "1"}] + GOOD_ROWS[2:])
    (root / "latin1.jsonl").write_bytes(_jsonl(root / "tmp.jsonl", GOOD_ROWS[:3]) and
                                        (root / "tmp.jsonl").read_bytes() + '{"prompt": "caf\u00e9", "answer": "1"}\n'.encode("latin-1"))
    (root / "tmp.jsonl").unlink()
    (root / "empty.jsonl").write_text("\n\n")
    _jsonl(root / "long.jsonl", GOOD_ROWS + [{"prompt": "word " * 600, "answer": "1"}])
    _jsonl(root / "ifeval-bad.jsonl", [{"prompt": "Write.", "instruction_id_list": ["no:such_id"], "kwargs": [{}]}] * 4)
    # run directories
    (root / "notes").mkdir()
    (root / "notes" / "notes.txt").write_text("keep me")
    (root / "grpo-run").mkdir()
    (root / "grpo-run" / "essa-run.json").write_text('{"kind": "grpo"}')
    (root / "grpo-run" / "config.json").write_text("{}")
    for name, damage in (("truncated", lambda b: b[: len(b) // 2]), ("empty", lambda b: b""),
                         ("garbage", lambda b: b"\x80\x04garbage-not-a-zip" * 50)):
        shutil.copytree(root / "finished", root / f"ckpt-{name}")
        p = root / f"ckpt-{name}" / "checkpoint.npz"
        p.write_bytes(damage(p.read_bytes()))
    shutil.copytree(root / "finished", root / "bad-config")
    (root / "bad-config" / "config.json").write_text('{"model": ')
    (root / "a-file").write_text("not a folder")
    (root / "eval-existing.jsonl").write_text('{"earlier": "evaluation"}\n')
    (root / "list.yaml").write_text("- a\n- b\n")
    (root / "broken.yaml").write_text("model: [unclosed\n")
    return root


def _train(ws, **over):
    args = ["train", "--config", str(ws / "base.yaml"), "--set", f"output_dir={ws / 'new-run'}"]
    for k, v in over.items():
        args += ["--set", f"{k}={v}"]
    return args


def _eval(ws, *extra):
    return ["eval", "--model", str(ws / "model-copy"), "--task", "gsm8k", "--data", str(ws / "good.jsonl"), "--limit", "2",
            "--max-new-tokens", "2", "--device", "cpu", "--output", str(ws / "new-eval.jsonl"), *extra]


def _grpo(ws, **over):
    args = ["grpo", "--config", str(ws / "grpo.yaml")]
    for k, v in over.items():
        args += ["--set", f"{k}={v}"]
    return args


# (id, argv builder, message regex, the case may create files)
CASES = [
    # -- config
    ("config-unknown-key", lambda w: _train(w, bogus=1), "unknown config key 'bogus'", False),
    ("config-val-size-0", lambda w: _train(w, val_size=0), "val_size must be >= 1", False),
    ("config-test-limit-neg", lambda w: _train(w, test_limit=-1), "test_limit must be >= 0", False),
    ("config-temperature-neg", lambda w: _train(w, **{"generation.temperature": -1}), "temperature must be >= 0", False),
    ("config-num-samples-0", lambda w: _train(w, **{"generation.num_samples": 0}), "num_samples >= 1", False),
    ("config-device-bogus", lambda w: _train(w, device="bogus"), "unknown device 'bogus'", False),
    ("config-popsize-1", lambda w: _train(w, popsize=1), "popsize must be >= 2", False),
    ("config-reward-timeout-0", lambda w: _train(w, reward_timeout=0), "reward_timeout must be > 0", False),
    ("config-type", lambda w: _train(w, popsize="many"), "popsize must be int", False),
    ("config-section-scalar", lambda w: _train(w, **{"generation": 3}), "generation must be a mapping", False),
    ("config-set-no-equals", lambda w: ["train", "--config", str(w / "base.yaml"), "--set", "popsize"], "expects key=value", False),
    ("config-set-bad-yaml", lambda w: _train(w, popsize="[1"), "not a YAML value", False),
    ("config-file-missing", lambda w: ["train", "--config", str(w / "nope.yaml")], "does not exist", False),
    ("config-file-list", lambda w: ["train", "--config", str(w / "list.yaml")], "must hold a mapping", False),
    ("config-file-syntax", lambda w: ["train", "--config", str(w / "broken.yaml")], "not valid YAML", False),
    ("config-resume-and-set", lambda w: ["train", "--resume", str(w / "finished"), "--set", "generations=5"],
     "drop --config/--set", False),
    ("config-reward-options", lambda w: _train(w, **{"reward_options.colour": "red"}), "unknown reward_options key", False),
    ("config-resume-bad-flag", lambda w: ["train", "--resume", str(w / "finished"), "--distributed-workers", "[1"],
     "not a YAML value", False),
    ("config-workers-neg", lambda w: _train(w, **{"distributed.workers": -1}), "distributed.workers must be >= 0", False),
    ("config-address-no-workers", lambda w: _train(w, **{"distributed.address": "auto"}), "distributed.workers is 0", False),
    ("config-worker-resources", lambda w: _train(w, **{"distributed.resources_per_worker": "{gpus: 1}"}),
     "unknown distributed.resources_per_worker key 'gpus'", False),
    ("cluster-too-many-workers", lambda w: _train(w, **{"distributed.workers": 64}), "64 workers need 64 CPUs", False),
    ("cluster-no-answer", lambda w: _train(w, **{"distributed.workers": 1, "distributed.address": "127.0.0.1:1"}),
     "no Ray cluster answers at 127.0.0.1:1", False),
    ("cluster-address-form", lambda w: _eval(w, "--distributed-workers", "1", "--distributed-address", "headnode"),
     "not auto or HOST:PORT", False),
    ("config-engine-bogus", lambda w: _train(w, engine="turbo"), "unknown engine 'turbo'", False),
    ("config-vllm-quantized", lambda w: _eval(w, "--engine", "vllm", "--quantization", "int8"),
     "quantization int8 is the native engine's", False),
    ("config-vllm-options-native", lambda w: _train(w, vllm="{tensor_parallel_size: 2}"), "engine is not vllm", False),
    ("config-grpo-vllm", lambda w: _grpo(w, engine="vllm"), "use engine native", False),
    ("config-eval-limit-0", lambda w: _eval(w, "--limit", "0"), "limit must be >= 1", False),
    ("config-eval-device", lambda w: _eval(w, "--device", "gpu7"), "unknown device", False),
    ("config-grpo-device", lambda w: _grpo(w, device="tpu"), "unknown device", False),
    ("config-data-n-0", lambda w: ["data", "ifeval-like", "--n", "0", "--out", str(w / "x.jsonl")], "--n must be >= 1", False),
    # -- data
    ("data-missing-file", lambda w: _train(w, train_data=str(w / "nope.jsonl")), "does not exist", False),
    ("data-no-prompt", lambda w: _train(w, train_data=str(w / "no-prompt.jsonl")), r"no-prompt.jsonl:6: no 'prompt'", False),
    ("data-no-answer", lambda w: _train(w, train_data=str(w / "no-answer.jsonl")), r"no-answer.jsonl:1: no 'answer' field", False),
    ("data-text-answer", lambda w: _train(w, train_data=str(w / "text-answer.jsonl")), r":4: answer 'seven' is not a number", False),
    ("data-not-object", lambda w: _train(w, train_data=str(w / "not-object.jsonl")), r":3 is a JSON list, not an object", False),
    ("data-bad-json", lambda w: _train(w, train_data=str(w / "bad-json.jsonl")), r":3 is not valid JSON", False),
    ("data-empty-prompt", lambda w: _train(w, train_data=str(w / "empty-prompt.jsonl")), r":3: no 'prompt'", False),
    ("data-not-utf8", lambda w: _train(w, train_data=str(w / "latin1.jsonl")), r"latin1.jsonl:4 is not UTF-8", False),
    ("data-empty-file", lambda w: _train(w, train_data=str(w / "empty.jsonl")), "holds no rows", False),
    ("data-too-long", lambda w: _train(w, train_data=str(w / "long.jsonl"), val_size=1), "exceeds the model's context", False),
    ("data-bad-test-file", lambda w: _train(w, test_data=str(w / "no-answer.jsonl"), test_limit="null"), "no 'answer' field", False),
    ("data-ifeval-id", lambda w: _train(w, task="ifeval", train_data=str(w / "ifeval-bad.jsonl")), "unknown IFEval instruction id", False),
    ("data-eval", lambda w: _eval(w, "--data", str(w / "text-answer.jsonl")), "is not a number", False),
    ("data-sft", lambda w: ["sft", "--model", str(w / "model-copy"), "--data", str(w / "no-prompt.jsonl"), "--output-dir",
                            str(w / "new-sft"), "--device", "cpu"], "no 'prompt'", False),
    ("data-val-size-too-big", lambda w: _train(w, val_size=12), "leaves no training data", False),
    # -- adapter
    ("adapter-missing", lambda w: _train(w, adapter=str(w / "nope")), "not a PEFT adapter folder", False),
    ("adapter-pickled", lambda w: _train(w, adapter=str(w / "pickled")), "not a PEFT adapter folder", False),
    ("adapter-pickled-grpo", lambda w: _grpo(w, adapter=str(w / "pickled")), "does not unpickle", False),
    ("adapter-pickled-eval", lambda w: _eval(w, "--adapter", str(w / "pickled")), "not a PEFT adapter folder", False),
    ("adapter-dora", lambda w: _train(w, adapter=str(w / "dora")), "DoRA", False),
    ("adapter-dora-on-a-worker", lambda w: _train(w, adapter=str(w / "dora"), **{"distributed.workers": 1}), "DoRA", False),
    ("adapter-modules-to-save", lambda w: _train(w, adapter=str(w / "saved")), "modules_to_save", False),
    ("adapter-bias", lambda w: _train(w, adapter=str(w / "bias")), "lora_bias", False),
    ("adapter-embedding", lambda w: _train(w, adapter=str(w / "embed")), "not a LoRA A/B matrix", False),
    ("adapter-garbage", lambda w: _train(w, adapter=str(w / "garbage-adapter")), "is damaged", False),
    ("adapter-genome-info", lambda w: ["genome", "info", "--adapter", str(w / "dora")], "DoRA", False),
    # -- model
    ("model-unknown-hub-id", lambda w: _eval(w, "--model", "essa-no-such-owner/no-such-model"), "could not load model", False),
    ("model-pickled", lambda w: _eval(w, "--model", str(w / "model-pickled")), "no .safetensors", False),
    ("model-remote-code", lambda w: _eval(w, "--model", str(w / "model-remote")), "could not load model", False),
    ("model-no-config", lambda w: _train(w, model=str(w / "model-noconfig")), "has no config.json", False),
    ("model-not-a-name", lambda w: _train(w, model="no such model"), "unknown model", False),
    # -- reward
    ("reward-missing-file", lambda w: _train(w, reward=f"{w}/nope.py:f"), "does not exist", False),
    ("reward-missing-function", lambda w: _train(w, reward=f"{w}/rewards_bad_inputs.py:nope"), "nope", False),
    ("reward-not-a-spec", lambda w: _train(w, reward="just words"), "unknown reward .just words.", False),
    ("reward-model-missing", lambda w: _train(w, reward=f"reward_model:{w}/nope"), "reward model|unknown model", False),
    ("reward-prompts-task", lambda w: _train(w, task="prompts", reward="null"), "has no reward of its own", False),
    ("reward-hangs", lambda w: _train(w, reward=f"{w}/rewards_bad_inputs.py:hangs", reward_timeout=1, output_dir=w / "hang-run"),
     "did not return within reward_timeout=1 s", True),
    # -- run directories
    ("rundir-not-a-run", lambda w: _train(w, output_dir=str(w / "notes")), "not empty and holds no essa train run", False),
    ("rundir-finished-train", lambda w: _train(w, output_dir=str(w / "finished")), "already holds an essa train run", False),
    ("rundir-grpo-run", lambda w: _train(w, output_dir=str(w / "grpo-run")), "already holds an essa grpo run", False),
    ("rundir-model-folder", lambda w: _train(w, output_dir=str(w / "model-copy")), "not empty", False),
    ("rundir-grpo-into-train", lambda w: _grpo(w, output_dir=str(w / "finished")), "already holds an essa train run", False),
    ("rundir-is-file", lambda w: _train(w, output_dir=str(w / "a-file")), "is a file", False),
    ("rundir-resume-not-a-run", lambda w: ["train", "--resume", str(w / "notes")], "not an `essa train` run directory", False),
    ("rundir-resume-grpo", lambda w: ["train", "--resume", str(w / "grpo-run")], "holds an essa grpo run", False),
    ("rundir-resume-missing", lambda w: ["train", "--resume", str(w / "nope")], "not an `essa train` run directory", False),
    ("rundir-ckpt-truncated", lambda w: ["train", "--resume", str(w / "ckpt-truncated")], "is damaged", False),
    ("rundir-ckpt-empty", lambda w: ["train", "--resume", str(w / "ckpt-empty")], "is damaged", False),
    ("rundir-ckpt-garbage", lambda w: ["train", "--resume", str(w / "ckpt-garbage")], "is damaged", False),
    ("rundir-config-damaged", lambda w: ["train", "--resume", str(w / "bad-config")], "is damaged", False),
    ("rundir-report-not-a-run", lambda w: ["report", str(w / "notes")], "has no metrics.jsonl", False),
    # -- output paths
    ("output-eval-exists", lambda w: _eval(w, "--output", str(w / "eval-existing.jsonl")), "exists .an earlier evaluation", False),
    ("output-eval-missing-folder", lambda w: _eval(w, "--output", str(w / "no" / "such" / "e.jsonl")), "cannot write", False),
    ("output-eval-is-folder", lambda w: _eval(w, "--output", str(w / "notes")), "cannot write", False),
    ("output-data-exists", lambda w: ["data", "ifeval-like", "--n", "2", "--out", str(w / "good.jsonl")], "exists", False),
    ("output-sft-nonempty", lambda w: ["sft", "--model", str(w / "model-copy"), "--data", str(w / "good.jsonl"),
                                       "--output-dir", str(w / "notes"), "--device", "cpu"], "not empty|exists", False),
]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_nothing_changed(ws, case, capsys, monkeypatch):
    name, argv, match, may_create = case
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = _snapshot(ws)
    code = main(argv(ws))
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("essa: error:")]
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    import re

    assert re.search(match, lines[0]), lines[0]
    after = _snapshot(ws)
    changed = [k for k in before if after.get(k) != before[k]]
    assert not changed, f"{name} changed or removed {changed}"
    if not may_create:
        assert set(after) == set(before), f"{name} created {sorted(set(after) - set(before))}"
    for leftover in ("new-run", "new-grpo", "new-sft"):
        if not may_create:
            assert not (ws / leftover).exists(), f"{name} left {leftover}/ behind"


def test_full_disk_is_one_line_and_leaves_nothing(ws, capsys, monkeypatch):
    """A write that fails with ENOSPC (simulated) during the start of a run: one line, exit 2, no folder left."""
    import essa.files

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(ws / "new-full" / "config.json"))

    monkeypatch.setattr(essa.files.tempfile, "mkstemp", full)
    before = _snapshot(ws)
    assert main(_train(ws, output_dir=str(ws / "new-full"))) == 2
    err = capsys.readouterr().err
    assert [x for x in err.splitlines() if x.startswith("essa: error:")] == [err.strip().splitlines()[-1]]
    assert "No space left on device" in err and "Traceback" not in err
    assert _snapshot(ws) == before and not (ws / "new-full").exists()


def test_damaged_metrics_line_is_skipped_by_report_and_resume(ws, tmp_path):
    """A kill mid-line leaves a cut-off last line in metrics.jsonl: `essa report` skips it, `--resume` drops it."""
    run = tmp_path / "cut"
    shutil.copytree(ws / "finished", run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"generation": 2, "fitness_me')
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").exists()
    cfg = json.loads((run / "config.json").read_text())
    cfg["generations"] = 2
    (run / "config.json").write_text(json.dumps(cfg))
    assert main(["train", "--resume", str(run)]) == 0
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]  # every line parses again
    assert [r["generation"] for r in recs if "fitness_mean" in r] == [1, 2]
