"""Generation on workers: one worker in this process (the default), or N Ray actors across GPUs and nodes.

    driver: strategy, data order, validation choice, checkpoints    workers: model + genome + reward, loaded once
      X = strategy.ask()
      ── a share: its candidates' offsets (K_w × n floats) + (candidate, prompt) index pairs ──▶
                                                   generate the share's rows, score them with the reward
      ◀── per candidate: the exact sum of its valid rewards, valid/invalid counts, tokens ──
      fitness = reduce(shares);  strategy.tell(X, fitness)

Only offsets and reward sums cross the wire per generation, never weights or completions: the traffic is
K·n·4 bytes down and a few hundred bytes per worker up, whatever the model's size (validation and test
return their completions' text, which the driver scores and writes).

Exactness: a worker returns each candidate's reward sum as an exact fraction (``fractions.Fraction`` of
the floats), so a candidate's fitness is the correctly rounded mean of its rewards whichever worker
scored which of its rows — a 2-worker run reproduces the 1-process run bit for bit when the completions
are the same. The one process path uses the same :class:`Worker` and reduction, in process.

Faults: a worker that dies (process killed, node lost) or runs past ``share_timeout`` on one share
(killed then) loses its share, which runs again on a live worker; Ray restarts the dead actor
(``max_restarts``) and it rejoins once it answers. The run stops with one line only when no worker is
alive and none can be restarted within ``start_timeout``.
"""

from __future__ import annotations

import math
import os
import pickle
import time
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable, Sequence

import numpy as np

from essa import EssaError
from essa.config import help_field
from essa.engine import EngineConfig, all_pairs, by_candidate
from essa.files import fault_point
from essa.sampling import SamplingConfig


@dataclass
class DistributedConfig:
    """Where generation runs: in this process, or on Ray workers (one model copy each)."""

    workers: int = help_field(0, "0 = generate in this process (no Ray); N >= 1 = N Ray actors, each with its own model "
                              "copy, one per GPU (or per resources_per_worker)")
    address: str | None = help_field(None, "Ray cluster: null = start a local Ray for this run (loopback only); 'auto' = "
                                     "join the cluster started with `ray start` on this machine; HOST:PORT = that head's GCS")
    resources_per_worker: dict = help_field({}, "Ray resources of one worker, e.g. {num_gpus: 1} or {num_cpus: 4}; "
                                            "{} = one GPU when device is cuda (or auto and the cluster has GPUs), else one CPU")
    share_timeout: float = help_field(1800.0, "seconds one worker may spend on one share of a generation; past it the worker "
                                      "counts as hung: it is killed (and restarted) and its share runs on another worker")
    start_timeout: float = help_field(600.0, "seconds a worker may take to start or restart (load the model) before it counts as lost")
    max_restarts: int = help_field(3, "restarts of each worker after a death or hang; the run ends when no worker is left")

    def validate(self):
        if self.workers < 0:
            raise EssaError(f"distributed.workers must be >= 0 (0 = this process), got {self.workers}")
        if self.address is not None and self.workers == 0:
            raise EssaError("distributed.address is set but distributed.workers is 0; set workers: N to use the cluster")
        if not (self.share_timeout > 0 and self.start_timeout > 0) or self.max_restarts < 0:
            raise EssaError("distributed.share_timeout and start_timeout must be > 0 seconds and max_restarts >= 0")
        unknown = sorted(set(self.resources_per_worker) - {"num_cpus", "num_gpus", "memory", "resources"})
        if unknown:
            raise EssaError(f"unknown distributed.resources_per_worker key {unknown[0]!r}; valid: num_cpus, num_gpus, "
                            f"memory, resources (custom Ray resources, e.g. {{resources: {{node_b: 1}}}})")


@dataclass
class PromptSet:
    """Prompts a worker keeps for the whole run: tokenized once with the model's chat template."""

    prompts: list[str]                  #: prompt texts (user turns)
    max_new_tokens: int                 #: checked against the model's context when the worker starts
    what: str                           #: how errors name it: "training", "validation", "test", "evaluation"
    rows: list[dict] | None = None      #: the rows (reward columns), for sets that are scored on the worker


@dataclass
class WorkerSpec:
    """Everything a worker loads once: model, adapter genome, engine settings, prompts and reward."""

    model: str
    adapter: str | None
    engine: EngineConfig
    alpha: float = 1.0
    clamp_min: float | None = None
    balance: bool = True
    system_prompt: str | None = None
    prompt_sets: dict[str, PromptSet] = field(default_factory=dict)
    reward: object = None               #: a reward spec (`essa.rewards.resolve_reward`) or a callable; None = none
    reward_options: dict = field(default_factory=dict)
    reward_timeout: float | None = None


@dataclass
class FitnessShare:
    """What a worker returns for its share of a generation (a few numbers per candidate)."""

    candidates: list[int]               #: the generation's candidate indices this share holds rows of
    sums: list[Fraction]                #: exact sum of each candidate's valid rewards
    valid: list[int]                    #: valid rewards per candidate
    invalid: list[int]                  #: invalid (None/NaN/raised) rewards per candidate
    min_valid: float | None             #: lowest valid reward of the share (invalid ones score the generation's lowest)
    tokens: int                         #: completion tokens generated
    samples: list[list[tuple[int, str, float]]]  #: per candidate, its first rows: (prompt index, completion, raw reward)


@dataclass
class Fitness:
    """A generation's fitness, reduced from its shares."""

    values: np.ndarray                  #: [K] mean reward per candidate (invalid = the generation's worst valid)
    invalid: int
    any_valid: bool
    tokens: int
    samples: list[list[tuple[int, str, float]]]  #: per candidate, its first logged rows
    wire_down: int = 0                  #: bytes sent to workers (0 in process)
    wire_up: int = 0                    #: bytes received from workers


# ------------------------------------------------------------------------------ one worker

class Worker:
    """Holds the engine, the prompt sets and the reward; a Ray actor with ``workers: N``, a plain object without.

    Never raises from ``__init__`` (a failed start is reported by :meth:`info`, so the driver prints its
    one line instead of a Ray traceback)."""

    def __init__(self, spec: WorkerSpec, index: int = 0):
        self.index, self.error = index, None
        try:
            self._start(spec)
        except Exception as e:  # noqa: BLE001 - handed to the driver (LocalPool re-raises it as it is)
            self.error = e

    def _start(self, spec: WorkerSpec):
        from essa.chat import chat_prompts
        from essa.engine import check_context
        from essa.engines import build_engine
        from essa.rewards import resolve_reward, with_timeout

        self.engine = build_engine(spec.model, spec.adapter, spec.engine, spec.alpha, spec.clamp_min, spec.balance)
        self.ids, self.rows = {}, {}
        for name, ps in spec.prompt_sets.items():
            self.ids[name] = chat_prompts(self.engine.tokenizer, ps.prompts, spec.system_prompt)
            check_context(self.engine.context_length, self.ids[name], ps.max_new_tokens, ps.what)
            self.rows[name] = ps.rows
        self.reward_fn = None
        if spec.reward is not None:
            self.reward_fn = with_timeout(resolve_reward(spec.reward, device=str(self.engine.device),
                                                         system_prompt=spec.system_prompt, **spec.reward_options),
                                          spec.reward_timeout)

    def info(self) -> dict:
        import socket

        if isinstance(self.error, EssaError):
            return {"error": str(self.error)}
        if self.error is not None:
            return {"error": f"worker {self.index} could not start: {type(self.error).__name__}: {self.error}"}
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(self.engine.device)}

    def ping(self) -> int:
        return os.getpid()

    def generate(self, name: str, candidates, pairs: Sequence[tuple[int, int]], sampling: SamplingConfig,
                 progress: Callable[[int, int], None] | None = None):
        """Completions of the (candidate, prompt) pairs of prompt set ``name``: (out[i][s], tokens)."""
        fault_point("worker_share")
        candidates = None if candidates is None else np.array(candidates)  # Ray hands arrays over read-only
        tok0 = self.engine.stats.useful_tokens
        step = None if progress is None else (lambda done, toks: progress(done, toks - tok0))
        out = self.engine.generate_pairs(self.ids[name], candidates, pairs, sampling, step)
        return out, self.engine.stats.useful_tokens - tok0

    def fitness(self, name: str, cand_ids: list[int], candidates, pairs: Sequence[tuple[int, int]], sampling: SamplingConfig,
                log_rows: int, progress: Callable[[int, int], None] | None = None) -> FitnessShare:
        """Generate and score a share: ``pairs`` index ``candidates`` (rows of the share's candidates
        ``cand_ids``) and the prompts of set ``name``."""
        from essa.rewards import reward_columns, safe_rewards

        out, tokens = self.generate(name, candidates, pairs, sampling, progress)
        rows = [self.rows[name][p] for _, p in pairs for _ in range(sampling.num_samples)]
        texts = [c.text for samples in out for c in samples]
        raw, _ = safe_rewards(self.reward_fn, [r["prompt"] for r in rows], texts, reward_columns(rows))
        K = len(cand_ids)
        sums, valid, invalid = [Fraction(0)] * K, [0] * K, [0] * K
        samples: list[list] = [[] for _ in range(K)]
        j = 0
        for k, p in pairs:
            for _ in range(sampling.num_samples):
                v = raw[j]
                if math.isfinite(v):
                    sums[k], valid[k] = sums[k] + Fraction(v), valid[k] + 1
                else:
                    invalid[k] += 1
                if len(samples[k]) < log_rows:
                    samples[k].append((p, texts[j], v))
                j += 1
        finite = [v for v in raw if math.isfinite(v)]
        return FitnessShare(list(cand_ids), sums, valid, invalid, min(finite) if finite else None, tokens, samples)

    def calibrate(self, name: str, indices: list[int], target_kl: float, seed: int) -> tuple[float, list[dict]]:
        """sigma0 'auto' (`essa.explore`): the step whose candidates move the model by ``target_kl``."""
        from essa.explore import MovementProbe, calibrate_sigma

        probe = MovementProbe(self.engine, [self.ids[name][i] for i in indices], n_candidates=4, max_new_tokens=32, seed=seed)
        return calibrate_sigma(probe, target_kl)


def reduce_fitness(K: int, shares: Sequence[FitnessShare]) -> Fitness:
    """Per-candidate mean reward from the shares: exact sums, one correctly rounded division; invalid
    rewards score the lowest valid reward of the whole generation (0.0 when none is valid)."""
    lows = [s.min_valid for s in shares if s.min_valid is not None]
    worst = Fraction(min(lows)) if lows else Fraction(0)
    total, count, invalid = [Fraction(0)] * K, [0] * K, [0] * K
    samples: list[list] = [[] for _ in range(K)]
    tokens = 0
    for s in shares:
        tokens += s.tokens
        for j, k in enumerate(s.candidates):
            total[k] += s.sums[j] + s.invalid[j] * worst
            count[k] += s.valid[j] + s.invalid[j]
            invalid[k] += s.invalid[j]
            samples[k].extend(s.samples[j])
    values = np.array([float(t / c) if c else 0.0 for t, c in zip(total, count)], dtype=np.float64)
    return Fitness(values, sum(invalid), bool(lows), tokens, samples)


def split_pairs(pairs: Sequence[tuple[int, int]], n: int) -> list[list[tuple[int, int]]]:
    """``pairs`` in ``n`` contiguous shares of (nearly) equal size (empty shares dropped)."""
    bounds = np.linspace(0, len(pairs), n + 1).round().astype(int)
    return [list(pairs[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def share_request(X: np.ndarray, pairs: list[tuple[int, int]]):
    """(candidate ids, their offsets as float32, pairs renumbered into them): what a share sends down.
    The engine computes in float32, so float32 offsets give the same completions."""
    cand_ids = sorted({k for k, _ in pairs})
    local = {k: j for j, k in enumerate(cand_ids)}
    return cand_ids, np.asarray(X, dtype=np.float32)[cand_ids], [(local[k], p) for k, p in pairs]


def rows_done(shares: list[list], sampling: SamplingConfig, progress: Callable[[int, int | None], None] | None):
    """A callback for finished shares that reports rows done to ``progress(rows, tokens=None)``."""
    done = [0]

    def step(r: int):
        done[0] += len(shares[r])
        if progress:
            progress(done[0] * sampling.num_samples, None)

    return step


# ------------------------------------------------------------------------------ pools

class LocalPool:
    """The one process path: a single :class:`Worker` in this process (no Ray, nothing on the wire)."""

    def __init__(self, spec: WorkerSpec):
        self.worker = Worker(spec)
        if self.worker.error is not None:
            raise self.worker.error
        self.genome = self.worker.engine.genome
        self.device = str(self.worker.engine.device)
        self.workers = 1

    def fitness(self, name: str, X, pairs, sampling: SamplingConfig, log_rows: int, progress=None) -> Fitness:
        cand_ids, cands, local = share_request(X, pairs)
        return reduce_fitness(len(X), [self.worker.fitness(name, cand_ids, cands, local, sampling, log_rows, progress)])

    def generate(self, name: str, candidates, sampling: SamplingConfig, progress=None) -> tuple[list, int]:
        """Completions of every (candidate, prompt) of set ``name``: (out[k][p][s], tokens)."""
        K = 1 if candidates is None else len(candidates)
        n = len(self.worker.ids[name])
        flat, tokens = self.worker.generate(name, candidates, all_pairs(K, n), sampling, progress)
        return by_candidate(flat, K, n), tokens

    def calibrate(self, name: str, indices: list[int], target_kl: float, seed: int):
        return self.worker.calibrate(name, indices, target_kl, seed)

    def close(self):
        self.worker.engine.close()


def make_pool(spec: WorkerSpec, dist: DistributedConfig | None):
    """The in-process worker (``workers: 0``) or a :class:`RayPool` of ``workers`` actors."""
    if dist is None or dist.workers == 0:
        return LocalPool(spec)
    return RayPool(spec, dist)


#: Ray's switch for multi-node clusters; "0" makes a node bind to 127.0.0.1 (ray_constants.ENABLE_RAY_CLUSTER)
LOOPBACK_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect_ray(address: str | None):
    """Start a local Ray on loopback (``address`` null) or join a cluster (``auto`` or HOST:PORT)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise EssaError("distributed.workers needs Ray: pip install 'ray>=2.60' (installed by `make install`)")
    local = address in (None, "local")
    # one node on loopback (else Ray 2.60 binds this host's outward address): read by ray at import and by the
    # processes ray.init starts; such a node cannot take other nodes, so the flag is restored after the start
    saved = os.environ.get(LOOPBACK_FLAG)
    if local:
        os.environ[LOOPBACK_FLAG] = "0"
    try:
        import ray

        if ray.is_initialized():
            return False
        return _init_ray(ray, address)
    finally:
        if local:
            if saved is None:
                del os.environ[LOOPBACK_FLAG]
            else:
                os.environ[LOOPBACK_FLAG] = saved


def _init_ray(ray, address: str | None) -> bool:
    import logging

    kw = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=True)
    try:
        if address in (None, "local"):
            ray.init(address="local", **kw)
        else:
            ray.init(address=check_cluster_address(address), **kw)
    except ConnectionError as e:
        raise EssaError(f"cannot join the Ray cluster at {address!r} ({str(e).splitlines()[0][:200]}); start it with "
                        f"`ray start --head` or fix distributed.address") from None
    return True


def check_cluster_address(address: str) -> str:
    """The head's HOST:PORT for ``address`` (``auto``: RAY_ADDRESS, else the cluster `ray start` last recorded in
    /tmp/ray/ray_current_cluster, as `ray.init` documents), checked to answer within 5 s: Ray itself
    retries a dead address for minutes."""
    import socket

    if address.startswith("ray://"):
        return address  # Ray Client: its own connection handling
    target = address
    if address == "auto":
        record = "/tmp/ray/ray_current_cluster"
        target = os.environ.get("RAY_ADDRESS") or (open(record).read().strip() if os.path.exists(record) else "")
        if not target:
            raise EssaError("distributed.address is auto but no Ray cluster runs on this machine; start one with "
                            "`ray start --head` or give HOST:PORT")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise EssaError(f"distributed.address {address!r} is not auto or HOST:PORT (the head's GCS, e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise EssaError(f"no Ray cluster answers at {target} ({e.strerror or e}); start it with `ray start --head` "
                        f"or fix distributed.address" + (" (auto read a stale record of a stopped cluster)"
                                                         if address == "auto" else "")) from None
    return target


class RayPool:
    """``workers`` Ray actors; a generation's rows split into one share per live worker (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, dist: DistributedConfig):
        self.dist, self.started_ray = dist, connect_ray(dist.address)
        import ray

        self.workers = dist.workers
        try:
            opts = self.resources = self._resources(spec.engine.device)
            actor = ray.remote(Worker)
            spec_ref = ray.put(spec)
            self.actors = [actor.options(max_restarts=dist.max_restarts, max_task_retries=0, **opts).remote(spec_ref, i)
                           for i in range(dist.workers)]
            self.alive = [True] * dist.workers
            self.restarts = [0] * dist.workers
            self.lost_at: dict[int, float] = {}
            self.pings: dict = {}
            infos = self._start_all()
            self.device = f"ray: {dist.workers} workers ({', '.join(sorted({i['device'] for i in infos}))})"
            if spec.adapter:
                from essa.genome import load_genome

                self.genome = load_genome(spec.adapter, spec.alpha, spec.balance)
            else:
                self.genome = None
            self.sizes = {name: len(ps.prompts) for name, ps in spec.prompt_sets.items()}
        except BaseException:
            self.close()
            raise

    def _resources(self, device: str) -> dict:
        import ray

        res = dict(self.dist.resources_per_worker)
        if not res:
            gpus = ray.cluster_resources().get("GPU", 0)
            res = {"num_gpus": 1} if device.startswith("cuda") or (device == "auto" and gpus > 0) else {"num_cpus": 1}
        if self.dist.address in (None, "local"):  # one machine: say now what can never be placed
            for key, name in (("num_gpus", "GPU"), ("num_cpus", "CPU")):
                need, have = res.get(key, 0) * self.dist.workers, ray.cluster_resources().get(name, 0)
                if need > have:
                    raise EssaError(f"{self.dist.workers} workers need {need:g} {name}s but this machine has {have:g}; "
                                    f"lower distributed.workers or set distributed.resources_per_worker "
                                    f"(e.g. {{{key}: {have / self.dist.workers:g}}})")
        return res

    def _start_all(self) -> list[dict]:
        import ray

        refs = [a.info.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self.dist.start_timeout)
        if len(ready) < len(refs):
            raise EssaError(f"only {len(ready)} of {len(refs)} workers started within start_timeout="
                            f"{self.dist.start_timeout:g} s (not enough free {', '.join(f'{k}={v}' for k, v in self.resources.items())} in the cluster?); "
                            f"lower distributed.workers or raise start_timeout")
        infos = ray.get(refs)
        for i in infos:
            if "error" in i:
                raise EssaError(i["error"])
        return infos

    # ---- worker health
    def _lose(self, i: int, why: str, kill: bool = False):
        import ray

        self.alive[i] = False
        if kill:
            ray.kill(self.actors[i], no_restart=False)
        self.restarts[i] += 1
        if self.restarts[i] > self.dist.max_restarts:
            print(f"essa: worker {i} {why}; no restarts left (max_restarts={self.dist.max_restarts})")
            self.lost_at.pop(i, None)
            return
        print(f"essa: worker {i} {why}; its share runs again on another worker, and it restarts")
        self.lost_at[i] = time.monotonic()

    def _poll_restarts(self):
        """Ping restarting workers; one that answers is alive again; past start_timeout it is given up."""
        import ray

        for i in list(self.lost_at):
            ref = self.pings.get(i)
            if ref is None:
                self.pings[i] = self.actors[i].ping.remote()
                continue
            done, _ = ray.wait([ref], timeout=0)
            if done:
                del self.pings[i]
                try:
                    ray.get(ref)
                    self.alive[i] = True
                    del self.lost_at[i]
                    print(f"essa: worker {i} is back")
                    continue
                except ray.exceptions.ActorDiedError:
                    del self.lost_at[i]   # restarts exhausted by Ray
                    continue
                except ray.exceptions.RayError:
                    pass                  # still restarting: ping again next time
            if i in self.lost_at and time.monotonic() - self.lost_at[i] > self.dist.start_timeout:
                print(f"essa: worker {i} did not restart within start_timeout={self.dist.start_timeout:g} s; given up")
                del self.lost_at[i]
                self.pings.pop(i, None)
                ray.kill(self.actors[i], no_restart=True)

    def _run(self, method: str, requests: list[tuple], progress: Callable[[int], None] | None = None) -> tuple[list, int, int]:
        """Run each request (the arguments of ``method``) on some live worker; (results, bytes down, bytes up)."""
        import ray

        results: list = [None] * len(requests)
        todo, running = deque(range(len(requests))), {}
        down = up = 0
        while todo or running:
            self._poll_restarts()
            busy = {i for i, _, _ in running.values()}
            for i in range(len(self.actors)):
                if todo and self.alive[i] and i not in busy:
                    r = todo.popleft()
                    down += len(pickle.dumps(requests[r]))
                    running[getattr(self.actors[i], method).remote(*requests[r])] = (i, r, time.monotonic())
            if not running:
                if not self.lost_at:
                    raise EssaError(f"every worker is lost and none can be restarted (max_restarts={self.dist.max_restarts}, "
                                    f"start_timeout={self.dist.start_timeout:g} s); check the workers' logs and resources, "
                                    f"then continue with --resume")
                time.sleep(0.5)
                continue
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                i, r, _ = running.pop(ref)
                try:
                    results[r] = ray.get(ref)
                except ray.exceptions.RayTaskError as e:  # the worker's own error (bad reward, reward timeout): stop
                    cause = e.cause if isinstance(getattr(e, "cause", None), BaseException) else None
                    if isinstance(cause, EssaError):
                        raise EssaError(str(cause)) from None
                    raise EssaError(f"worker {i} failed: {str(e).strip().splitlines()[-1][:300]}") from None
                except ray.exceptions.RayError as e:      # the actor died or is unreachable: rerun elsewhere
                    self._lose(i, f"was lost ({type(e).__name__})")
                    todo.appendleft(r)
                    continue
                up += len(pickle.dumps(results[r]))
                if progress:
                    progress(r)
            now = time.monotonic()
            for ref, (i, r, t) in list(running.items()):
                if now - t > self.dist.share_timeout:
                    running.pop(ref)
                    self._lose(i, f"hung (no answer within share_timeout={self.dist.share_timeout:g} s)", kill=True)
                    todo.appendleft(r)
        return results, down, up

    def fitness(self, name: str, X, pairs, sampling: SamplingConfig, log_rows: int, progress=None) -> Fitness:
        shares = split_pairs(pairs, self.workers)
        requests = [(name, *share_request(X, s), sampling, log_rows) for s in shares]
        results, down, up = self._run("fitness", requests, rows_done(shares, sampling, progress))
        fit = reduce_fitness(len(X), results)
        fit.wire_down, fit.wire_up = down, up
        return fit

    def generate(self, name: str, candidates, sampling: SamplingConfig, progress=None) -> tuple[list, int]:
        K = 1 if candidates is None else len(candidates)
        n = self.sizes[name]
        shares = split_pairs(all_pairs(K, n), self.workers)
        requests = []
        for s in shares:
            if candidates is None:
                requests.append((name, None, s, sampling))
            else:
                cand_ids, cands, local = share_request(candidates, s)
                requests.append((name, cands, local, sampling))
        results, _, _ = self._run("generate", requests, rows_done(shares, sampling, progress))
        flat = [c for out, _ in results for c in out]
        return by_candidate(flat, K, n), sum(t for _, t in results)

    def calibrate(self, name: str, indices: list[int], target_kl: float, seed: int):
        (result,), _, _ = self._run("calibrate", [(name, indices, target_kl, seed)])
        return result

    def close(self):
        import ray

        for a in getattr(self, "actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - best effort at shutdown
                pass
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
