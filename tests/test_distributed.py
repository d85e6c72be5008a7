"""Generation on Ray workers (essa.distributed): a 2-worker run reproduces the 1-process run exactly, a killed
or hung worker's share runs again elsewhere with the same result, the run ends with one line when no worker
is left (and resumes), and a two-node cluster on this machine survives losing its second node.

Every run here is the `essa` command in a subprocess (the fault hooks are environment variables that Ray's
processes inherit); the local Ray binds to loopback, the two-node cluster to this machine's own address.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from essa.config import from_dict
from essa.trainer import TrainConfig, train
from helpers import tiny_sft_adapter

REWARD = '''
def vowel_fraction(prompts, completions, **columns):
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]
'''


@pytest.fixture(scope="module")
def ref(tiny_model_dir, tmp_path_factory):
    """Workspace + the reference: the same run in one process (no Ray)."""
    root = tmp_path_factory.mktemp("distributed")
    tiny_sft_adapter(tiny_model_dir, root / "sft")
    (root / "rewards_distributed.py").write_text(REWARD)
    cfg = {"model": tiny_model_dir, "adapter": str(root / "sft"), "task": "gsm8k",
           "reward": f"{root}/rewards_distributed.py:vowel_fraction", "generations": 3, "popsize": 4, "sigma0": 0.5,
           "batch_size": 6, "val_size": 4, "test_limit": 3, "eval_every": 2, "generation": {"max_new_tokens": 8},
           "device": "cpu", "tensorboard": False, "seed": 1}
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    train(from_dict(TrainConfig, {**cfg, "output_dir": str(root / "one-process")}))
    return root


def results(run_dir: Path) -> list:
    """What must not depend on where generation ran: per generation fitness, sigma, validation."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["generation"], r.get("fitness_mean"), r.get("fitness_max"), r.get("fitness_min"), r.get("sigma"),
             r.get("val_mean")) for r in recs]


def essa(*args, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ESSA_FAULT")}
    full.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run([sys.executable, "-m", "essa.cli", *args], env=full, capture_output=True, text=True,
                          timeout=timeout)


def train_on_workers(root: Path, out: str, *extra: str, env: dict | None = None, workers: int = 2):
    return essa("train", "--config", str(root / "run.yaml"), "--output-dir", str(root / out),
                "--distributed-workers", str(workers), *extra, env=env)


def test_two_workers_reproduce_one_process(ref):
    """Greedy: per-generation fitness, sigma, validation and the test completions are identical; only
    offsets and reward sums go over the wire, a constant few KB per generation."""
    p = train_on_workers(ref, "two-workers")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ray: 2 workers (cpu)" in p.stdout
    assert results(ref / "two-workers") == results(ref / "one-process")
    for name in ("sft", "best", "final"):
        assert (ref / "two-workers" / f"test-{name}.jsonl").read_text() == (ref / "one-process" / f"test-{name}.jsonl").read_text()
    gens = [json.loads(x) for x in (ref / "two-workers" / "metrics.jsonl").read_text().splitlines() if '"fitness_mean"' in x]
    local = [json.loads(x) for x in (ref / "one-process" / "metrics.jsonl").read_text().splitlines() if '"fitness_mean"' in x]
    assert all(g["workers"] == 2 for g in gens) and all(g["wire_bytes_down"] == 0 and g["workers"] == 1 for g in local)
    # down: 4 candidates x 32 offsets (float32) + 24 index pairs, in 2 shares; up: a few numbers per candidate
    assert all(0 < g["wire_bytes_down"] < 2500 and 0 < g["wire_bytes_up"] < 3000 for g in gens), gens
    down = [g["wire_bytes_down"] for g in gens]
    assert max(down) - min(down) <= 16, down  # the same every generation (up to the pickled size of small ints)
    # eval on 2 workers writes what eval in process writes
    for workers, out in ((0, "eval-local.jsonl"), (2, "eval-ray.jsonl")):
        p = essa("eval", "--model", yaml.safe_load((ref / "run.yaml").read_text())["model"], "--adapter", str(ref / "sft"),
                 "--task", "gsm8k", "--limit", "5", "--max-new-tokens", "8", "--device", "cpu",
                 "--distributed-workers", str(workers), "--output", str(ref / out))
        assert p.returncode == 0, p.stderr[-3000:]
    assert (ref / "eval-ray.jsonl").read_text() == (ref / "eval-local.jsonl").read_text()


def test_worker_killed_mid_generation_share_runs_again(ref):
    p = train_on_workers(ref, "killed", env={"ESSA_FAULT": "worker_share:2", "ESSA_FAULT_ONCE": str(ref / "killed.once")})
    assert p.returncode == 0, p.stderr[-3000:]
    assert (ref / "killed.once").exists(), "the fault did not fire"
    assert re.search(r"essa: worker \d was lost", p.stdout), p.stdout[-2000:]
    assert results(ref / "killed") == results(ref / "one-process")


def test_hung_worker_is_killed_and_share_runs_again(ref):
    p = train_on_workers(ref, "hung", "--distributed-share-timeout", "6",
                         env={"ESSA_FAULT": "worker_share:2:hang", "ESSA_FAULT_ONCE": str(ref / "hung.once")})
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"essa: worker \d hung \(no answer within share_timeout=6 s\)", p.stdout), p.stdout[-2000:]
    assert results(ref / "hung") == results(ref / "one-process")


def test_no_worker_left_is_one_line_then_resume_finishes(ref):
    """Every worker dies (no restarts allowed): exit 2 with one line; the checkpoint is intact and `--resume`
    (here in process: where generation runs does not change the result) finishes the same run."""
    p = train_on_workers(ref, "all-lost", "--distributed-max-restarts", "0", env={"ESSA_FAULT": "worker_share:2"})
    assert p.returncode == 2, p.stderr[-3000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("essa: error:")]
    assert len(errors) == 1 and "every worker is lost" in errors[0] and "Traceback" not in p.stderr, p.stderr[-3000:]
    p = essa("train", "--resume", str(ref / "all-lost"), "--distributed-workers", "0")
    assert p.returncode == 0, p.stderr[-3000:]
    assert results(ref / "all-lost") == results(ref / "one-process")


def _ray(*args, env: dict, log: Path) -> subprocess.Popen:
    """`ray start ... --block` in its own process group (so the test can kill that node and nothing else)."""
    return subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", *args, "--block", "--disable-usage-stats"],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_two_node_cluster_survives_losing_a_node(ref, tmp_path):
    """A Ray head and a second Ray node as separate processes on this machine; the second node's worker hangs
    in generation 1 (a fault hook only that node has), the node is killed (SIGKILL of its process group)
    mid-generation, and the run completes on the head's worker with the one-process result."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}  # loopback-only test cluster
    env.pop("ESSA_FAULT", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # "0" (a one-node loopback Ray) would refuse the second node
    port = 6400 + os.getpid() % 500
    head = _ray("--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                env=env, log=tmp_path / "head.log")
    node = driver = None
    try:
        address = None
        for _ in range(120):
            m = re.search(r"ray start --address='([^']+)'", (tmp_path / "head.log").read_text())
            if m:
                address = m.group(1)
                break
            time.sleep(0.5)
        assert address, (tmp_path / "head.log").read_text()[-2000:]
        node = _ray(f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                    env={**env, "ESSA_FAULT": "worker_share:2:hang"}, log=tmp_path / "node.log")
        run = ref / "two-nodes"
        driver = subprocess.Popen([sys.executable, "-m", "essa.cli", "train", "--config", str(ref / "run.yaml"),
                                   "--output-dir", str(run), "--distributed-workers", "2", "--distributed-address", address,
                                   "--distributed-start-timeout", "60"],
                                  env=env, stdout=open(tmp_path / "driver.out", "w"), stderr=subprocess.STDOUT, text=True)
        for _ in range(240):  # generation 0 (validation) done: the node's worker hangs in generation 1 now
            if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().strip():
                break
            assert driver.poll() is None, (tmp_path / "driver.out").read_text()[-3000:]
            time.sleep(0.5)
        time.sleep(3)
        assert driver.poll() is None and len(results(run)) == 1, "the run did not stop at the hung node"
        os.killpg(node.pid, signal.SIGKILL)
        assert driver.wait(timeout=300) == 0, (tmp_path / "driver.out").read_text()[-3000:]
        out = (tmp_path / "driver.out").read_text()
        assert re.search(r"essa: worker \d was lost", out), out[-3000:]
        assert results(run) == results(ref / "one-process")
    finally:
        for proc in (driver, node, head):
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM) if proc is not driver else proc.kill()
                    proc.wait(timeout=30)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.real
def test_real_model_eval_on_two_workers_matches_one_process(real_model_name, tmp_path):
    """SmolLM2-135M-Instruct, greedy, 6 GSM8K test prompts: the completions of 2 Ray workers equal the in-process ones."""
    for workers in (0, 2):
        p = essa("eval", "--model", real_model_name, "--task", "gsm8k", "--limit", "6", "--max-new-tokens", "48",
                 "--device", "cpu", "--distributed-workers", str(workers), "--output", str(tmp_path / f"w{workers}.jsonl"),
                 timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    local = [json.loads(x) for x in (tmp_path / "w0.jsonl").read_text().splitlines()]
    ray = [json.loads(x) for x in (tmp_path / "w2.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in ray] == [r["completion"] for r in local]
    assert len({r["completion"] for r in local}) == 6  # six real, different answers
