"""SIGKILL a short `essa train` on the tiny model again and again — at named points inside the start, the
first validation, checkpoint writes, adapter exports and the summary (``ESSA_FAULT``), and at random
moments — restarting it each time as a user would (`--resume` once the folder holds a run, the same
command otherwise). Every run must end exactly like the uninterrupted one: same fitness and validation
curve, same checkpoint arrays, same adapters, same test scores, and no temporary files left."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from essa.checkpoint import load_checkpoint
from essa.config import from_dict
from essa.files import run_kind
from essa.trainer import TrainConfig, train
from helpers import tiny_sft_adapter

REWARD = '''
def vowels(prompts, completions, **columns):
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]
'''

#: kills at named points; each entry is one process's ESSA_FAULT (see essa.files.fault_point)
SCHEDULES = [
    # cycle 1: the start and the first validation
    ["write:1", "write:2", "validation:1", "checkpoint:1", "checkpoint:2", "validation:2", "export:1", "export:2",
     "summary:1", "install_dir:1"],
    # cycle 2: later checkpoints and writes
    ["checkpoint:3", "write:3", "checkpoint:2", "validation:3", "write:6", "install_dir:2", "summary:1"],
]
RANDOM_KILLS = 12


def _cfg(root: Path, out: str) -> dict:
    return {"model": str(root / "model"), "adapter": str(root / "sft"), "task": "gsm8k",
            "reward": f"{root}/fault_rewards.py:vowels", "generations": 4, "popsize": 4, "sigma0": 0.5, "batch_size": 3,
            "val_size": 3, "test_limit": 2, "eval_every": 2, "generation": {"max_new_tokens": 6},
            "output_dir": str(root / out), "device": "cpu", "tensorboard": False, "seed": 3}


def _launch(root: Path, run_dir: Path, fault: str | None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("ESSA_FAULT", None)
    if fault:
        env["ESSA_FAULT"] = fault
    if run_kind(run_dir) == "train":
        args = ["train", "--resume", str(run_dir)]
    else:
        args = ["train", "--config", str(root / f"{run_dir.name}.yaml")]
    return subprocess.Popen([sys.executable, "-m", "essa.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _outcome(run_dir: Path) -> dict:
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    drop = {"wall_seconds", "tokens_per_second"}
    meta, arrays = load_checkpoint(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"metrics": [{k: v for k, v in r.items() if k not in drop} for r in metrics],
            "loop": {k: v for k, v in meta["loop"].items() if k not in ("wall_seconds", "last_val_wall")},
            # cmaes allocates _funhist_values with np.empty: slots of generations not yet run hold whatever memory held
            "arrays": {k: v.tolist() for k, v in arrays.items() if k != "strategy/es._funhist_values"},
            "adapters": {n: {k: v.tolist() for k, v in load_file(str(run_dir / "adapters" / n / "adapter_model.safetensors")).items()}
                         for n in ("best", "final")},
            "summary": {k: v for k, v in summary.items() if k not in ("wall_seconds", "run_dir", "adapters")},
            "tests": {n: (run_dir / f"test-{n}.jsonl").read_text() for n in ("sft", "best", "final")}}


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("faults")
    shutil.copytree(tiny_model_dir, root / "model")
    tiny_sft_adapter(tiny_model_dir, root / "sft")
    (root / "fault_rewards.py").write_text(REWARD)
    ref = train(from_dict(TrainConfig, _cfg(root, "ref")))
    return root, _outcome(Path(ref["run_dir"]))


def test_sigkill_at_any_moment_then_resume_reproduces_the_run(world):
    root, reference = world
    rng = random.Random(0)
    kills, starts, t0, landed = 0, 0, time.perf_counter(), []
    plans = SCHEDULES + [["random"] * RANDOM_KILLS]
    for cycle, plan in enumerate(plans):
        run_dir = root / f"cycle{cycle}"
        (root / f"{run_dir.name}.yaml").write_text(yaml.safe_dump(_cfg(root, run_dir.name)))
        for action in plan + ["finish"]:
            proc = _launch(root, run_dir, action if ":" in action else None)
            starts += 1
            if action == "random":  # a random moment: from the imports to the end of the run
                try:
                    proc.wait(timeout=rng.uniform(1.5, 7.0))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
            err = proc.communicate(timeout=300)[1]
            if proc.returncode == -signal.SIGKILL:
                kills += 1
                landed.append(action)
                continue
            # not killed (the point was not reached, or the random moment came after the end): it must have finished
            assert proc.returncode == 0, f"start {starts} ({action}) failed:\n{err[-3000:]}"
        assert (run_dir / "summary.json").exists()
        got = _outcome(run_dir)
        for part in reference:
            if isinstance(reference[part], dict):
                differ = sorted(k for k in set(reference[part]) | set(got[part]) if got[part].get(k) != reference[part].get(k))
            else:
                differ = [i for i, (a, b) in enumerate(zip(got[part], reference[part])) if a != b] or (
                    ["length"] if len(got[part]) != len(reference[part]) else [])
            assert not differ, f"cycle {cycle}: {part} differs from the uninterrupted run at {differ}"
        leftovers = [p.name for p in list(run_dir.iterdir()) + list((run_dir / "adapters").iterdir())
                     if p.name.endswith(".tmp")]
        assert not leftovers, leftovers
    print(json.dumps({"kills": kills, "starts": starts, "seconds": round(time.perf_counter() - t0, 1), "landed": landed}))
    assert kills >= 20, f"only {kills} kills landed"
