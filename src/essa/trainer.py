"""The ESSA loop, in one place.

    SFT adapter ──SVD──▶ genome (frozen bases, singular values s₀)
    for each generation:
        X   = strategy.ask()                       # K offsets to s₀
        C   = engine(X × mini-batch of prompts)    # one batched generation for all candidates
        f_k = mean reward of candidate k's completions
        strategy.tell(X, f)                        # CMA-ES update (maximising f)
        every `eval_every` generations: validate the mean (and the best candidate so far) on a held-out
        split of *train*, keep the best-by-validation offset
        checkpoint (atomic, plain data)
    export best-by-validation and final-mean adapters; test them on the task's test split.

Selection uses a validation split carved from the RL training data, never the test set (the paper
selected on test; we report test separately).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from essa import EssaError
from essa.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from essa.config import from_dict, help_field, to_dict
from essa.distributed import DistributedConfig, PromptSet, WorkerSpec, make_pool
from essa.engine import EngineConfig, engine_settings
from essa.evaluate import Selection, paired_bootstrap, resolve_system_prompt, scored_rows, validation_score
from essa.files import (
    abandon_run_dir,
    append_jsonl,
    check_new_run_dir,
    fault_point,
    lock_run_dir,
    mark_run_dir,
    read_jsonl_lenient,
    remove_stale_temps,
    run_kind,
    start_run_dir,
    write_json,
    write_jsonl_atomic,
)
from essa.rewards import with_timeout
from essa.sampling import SamplingConfig
from essa.tasks import get_task, load_rows, seeded_split, split_rl_data


@dataclass
class RunConfig(EngineConfig):
    """What to align: the fields `essa train` and `essa grpo` share (same meaning in both)."""

    model: str = help_field("smollm2-135m-instruct", "base model: alias, hub id or local folder")
    adapter: str = help_field("", "SFT LoRA adapter folder (output of `essa sft`): the starting point")
    task: str = help_field("gsm8k", "task: gsm8k | math | ifeval (data splits, prompts, default reward, metrics)")
    reward: str | list | None = help_field(None, "reward: null = the task's reward; a task name; "
                                           "'module:function'; 'reward_model:PATH'; or a list of {reward, weight}")
    reward_options: dict = help_field({}, "options of reward models (reward_model:...): batch_size (16), trust_remote_code "
                                      "(false; ArmoRM needs true), max_length, score_head (auto = the output's .score "
                                      "when it has one, as ArmoRM's, else logits[:, 0]; score; logits:N)")
    system_prompt: str | None = help_field("task", "system prompt; 'task' = the task's default, null = none")
    train_data: str | None = help_field(None, "RL prompts: split name, .jsonl or HF id (default: the task's RL split)")
    val_size: int = help_field(200, "validation examples carved (seeded) from the RL data; never trained on")
    val_metric: str = help_field("auto", "what validation selects by: 'reward' = mean of the reward being optimised; a metric "
                                 "of the task's evaluation (gsm8k/math: accuracy; ifeval: accuracy = prompt_strict, "
                                 "inst_strict, prompt_loose, inst_loose); auto = accuracy with the task's own reward, "
                                 "'reward' with any other reward or the prompts task")
    test_data: str | None = help_field(None, "test rows for the final report: split name, .jsonl or HF id (default: the task's test split)")
    test_limit: int | None = help_field(None, "test examples for the final report (null = all, 0 = skip test)")
    test_num_samples: int = help_field(1, "k > 1: the final test also samples k completions per prompt (T 0.6, top-p 0.95) "
                                       "and reports avg@k and pass@k beside greedy")
    reward_timeout: float | None = help_field(1800.0, "seconds one reward call may take (one call scores a whole generation); "
                                              "past it the run stops with an error, resumable from its last checkpoint; "
                                              "null = no limit")

    def validate_run(self):
        if self.val_size < 1:
            raise EssaError(f"val_size must be >= 1 (validation rows carved from the training data), got {self.val_size}")
        if self.test_limit is not None and self.test_limit < 0:
            raise EssaError(f"test_limit must be >= 0 (0 = skip the test) or null (all), got {self.test_limit}")
        if self.test_num_samples < 1:
            raise EssaError(f"test_num_samples must be >= 1, got {self.test_num_samples}")
        if self.reward_timeout is not None and not (self.reward_timeout > 0):
            raise EssaError(f"reward_timeout must be > 0 seconds or null (no limit), got {self.reward_timeout}")
        self.validate_engine()


@dataclass
class TrainConfig(RunConfig):
    """`essa train`: ESSA over the singular values of an SFT LoRA adapter."""

    # -- genome and strategy
    alpha: float = help_field(1.0, "fraction of each factor's singular values that are trainable (k = floor(alpha*r))")
    balance: bool = help_field(True, "balance each LoRA pair (A/c, B*c, same B*A) before the SVD so both factors' singular values share one scale")
    clamp_min: float | None = help_field(None, "clamp singular values from below (e.g. 0.0); null = no clamp (sign flips allowed)")
    strategy: str = help_field("cma", "cma (full covariance) | sep_cma (separable) | nes (OpenAI-ES) | auto")
    strategy_opts: dict = help_field({}, "strategy options, e.g. {lr_adapt: true} for cma, {lr: 0.01, optimizer: adam} for nes")
    popsize: int = help_field(24, "candidates per generation (paper: 24-96)")
    sigma0: float | str | None = help_field("auto", "initial step size of the offsets: 'auto' = calibrated so candidates move "
                                            "the model by sigma_target_kl (essa.explore); a number = that offset; "
                                            "null = essa.strategies.DEFAULT_SIGMA0")
    sigma_target_kl: float = help_field(2e-3, "sigma0 auto: mean per-token KL(SFT || candidate) the first generation's candidates should have")
    calibration_prompts: int = help_field(4, "sigma0 auto: training prompts (x 4 directions x 32 tokens) the calibration measures on")
    generations: int = help_field(50, "number of strategy generations")
    # -- fitness
    batch_size: int = help_field(100, "prompts per mini-batch (paper: 100-500)")
    shared_batch: bool = help_field(True, "all candidates of a generation see the same mini-batch (common random numbers)")
    generation: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=256),
                                       metadata={"help": "decoding for fitness and validation (default greedy)"})
    # -- validation, logging, budget
    eval_every: int = help_field(5, "validate every N generations (and at start and end)")
    validate_best_candidate: bool = help_field(False, "also validate the best-fitness candidate so far (two models per validation "
                                               "instead of the mean alone; off so a validation costs what GRPO's does)")
    eval_every_seconds: float | None = help_field(None, "also validate when this much wall-clock time passed since the last validation")
    max_minutes: float | None = help_field(None, "stop after this wall-clock budget (minutes), then validate and export")
    samples_per_generation: int = help_field(3, "completions of the best candidate logged per generation (samples.jsonl)")
    tensorboard: bool = help_field(True, "write TensorBoard scalars to OUTPUT_DIR/tb")
    # -- run
    output_dir: str = help_field("runs/essa", "run directory: metrics, checkpoints, adapters, report")
    seed: int = help_field(0, "seed of the strategy and the data order")
    distributed: DistributedConfig = field(default_factory=DistributedConfig,
                                           metadata={"help": "generation on Ray workers (default: in this process)"})

    def validate(self):
        if not self.adapter:
            raise EssaError("config needs `adapter`: the SFT LoRA adapter folder (run `essa sft` first)")
        if self.popsize < 2 or self.generations < 0 or self.batch_size < 1 or self.eval_every < 1:
            raise EssaError("popsize must be >= 2, generations >= 0, batch_size >= 1 and eval_every >= 1")
        self.validate_run()
        if isinstance(self.sigma0, str) and self.sigma0 != "auto":
            raise EssaError(f"sigma0 must be a positive number, 'auto' or null, got {self.sigma0!r}")
        if isinstance(self.sigma0, float) and not (math.isfinite(self.sigma0) and self.sigma0 > 0):
            raise EssaError(f"sigma0 must be a positive number, got {self.sigma0!r}; or use sigma0: auto")
        if not (math.isfinite(self.sigma_target_kl) and self.sigma_target_kl > 0) or self.calibration_prompts < 1:
            raise EssaError("sigma_target_kl must be > 0 and calibration_prompts >= 1")


# ------------------------------------------------------------------------------ small helpers

@dataclass
class RunInputs:
    """In-memory inputs of a run (the Python API, `essa.api.ESSATrainer`); each replaces what the config names."""

    reward_fn: Callable | None = None       #: replaces `reward` (a TRL-signature function)
    train_rows: list[dict] | None = None    #: replaces `train_data` (rows with a text 'prompt' and other columns)
    val_rows: list[dict] | None = None      #: validation rows (None: `val_size` rows carved from the training rows)


def task_setup(cfg: RunConfig, inputs: RunInputs | None = None):
    """(task, system prompt, reward function, validation rows, training rows) of a run; `essa train` and
    `essa grpo` share it, so both see the same prompts, reward and held-out validation rows."""
    from essa.rewards import resolve_reward

    task = get_task(cfg.task)
    system_prompt = resolve_system_prompt(task, cfg.system_prompt)
    inputs = inputs or RunInputs()
    if cfg.reward is None and task.reward is None and inputs.reward_fn is None:
        raise EssaError(f"task {task.name!r} has no reward of its own; set `reward:` (e.g. reward_model:PATH or "
                        f"module:function)")
    opts = dict(cfg.reward_options)
    unknown = sorted(set(opts) - {"batch_size", "trust_remote_code", "max_length", "score_head"})
    if unknown:
        raise EssaError(f"unknown reward_options key {unknown[0]!r}; valid: batch_size, trust_remote_code, max_length, "
                        f"score_head")
    if inputs.reward_fn is not None:
        reward_fn = inputs.reward_fn
    else:
        reward_fn = (resolve_reward(cfg.reward, device=cfg.device, system_prompt=system_prompt, **opts)
                     if cfg.reward is not None else task.reward)
    reward_fn = with_timeout(reward_fn, cfg.reward_timeout)
    if inputs.train_rows is None:
        val_rows, train_rows = split_rl_data(task, cfg.train_data, cfg.val_size, cfg.seed)
    elif inputs.val_rows:
        val_rows, train_rows = inputs.val_rows, inputs.train_rows
    else:
        if cfg.val_size >= len(inputs.train_rows):
            raise EssaError(f"val_size {cfg.val_size} leaves no training rows out of {len(inputs.train_rows)}; lower it "
                            f"or pass eval_dataset")
        val_rows, train_rows = seeded_split(inputs.train_rows, [cfg.val_size, len(inputs.train_rows) - cfg.val_size],
                                            cfg.seed + 12345)
    return task, system_prompt, reward_fn, val_rows, train_rows


def load_test_rows(cfg: RunConfig, task) -> list[dict] | None:
    """The rows of the final test report (loaded and checked at the start, so a bad file fails in seconds,
    not after the training); None = no test."""
    source = cfg.test_data or task.test_split
    if cfg.test_limit == 0:
        return None
    if source is None:
        print(f"essa: task {task.name!r} has no test split; set test_data to report a test score")
        return None
    return load_rows(task, source, limit=cfg.test_limit)


def resolve_val_metric(cfg: RunConfig, task) -> str:
    """'auto' → 'accuracy' when the run optimises the task's own reward, else 'reward'."""
    if cfg.val_metric != "auto":
        return cfg.val_metric
    return "accuracy" if cfg.reward is None and task.reward is not None else "reward"


@dataclass
class LoopState:
    """What the loop carries from one generation to the next besides the strategy and the data cursor;
    saved in every checkpoint (scalars in its JSON, the two offsets as arrays)."""

    generation: int = 0                 #: generations done
    selection: Selection = field(default_factory=Selection)  #: best validation score so far, and its generation
    best_offset: np.ndarray | None = None     #: the offset that reached it (exported as adapters/best)
    best_fitness: float = -math.inf     #: highest mini-batch fitness seen
    best_candidate: np.ndarray | None = None  #: the candidate that reached it
    wall_seconds: float = 0.0           #: wall-clock of the run so far (calibration included)
    tokens: int = 0                     #: completion tokens generated for fitness
    invalid_rewards: int = 0            #: rewards that were None/NaN or raised (scored as the worst valid)
    last_val_wall: float = 0.0          #: wall_seconds at the last validation (eval_every_seconds)
    last_val_generation: int = 0        #: generation of the last validation

    @classmethod
    def start(cls, dimension: int, wall_seconds: float = 0.0) -> LoopState:
        return cls(best_offset=np.zeros(dimension), best_candidate=np.zeros(dimension), wall_seconds=wall_seconds)

    def meta(self) -> dict:
        return {"generation": self.generation, "best_val": self.selection.value,
                "best_val_generation": self.selection.generation, "best_fitness": self.best_fitness,
                "wall_seconds": self.wall_seconds, "tokens": self.tokens, "invalid_rewards": self.invalid_rewards,
                "last_val_wall": self.last_val_wall, "last_val_generation": self.last_val_generation}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"best_offset": np.asarray(self.best_offset), "best_candidate": np.asarray(self.best_candidate)}

    @classmethod
    def from_checkpoint(cls, meta: dict, arrays: dict[str, np.ndarray]) -> LoopState:
        return cls(generation=meta["generation"], selection=Selection(meta["best_val"], meta["best_val_generation"]),
                   best_offset=arrays["best_offset"], best_fitness=meta["best_fitness"],
                   best_candidate=arrays["best_candidate"], wall_seconds=meta["wall_seconds"], tokens=meta["tokens"],
                   invalid_rewards=meta["invalid_rewards"], last_val_wall=meta["last_val_wall"],
                   last_val_generation=meta.get("last_val_generation", meta["generation"]))


class DataStream:
    """Mini-batches drawn without replacement through the data, reshuffled (seeded) every epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.rng = n, np.random.Generator(np.random.PCG64(seed))
        self.order = self.rng.permutation(n)
        self.pos, self.epoch = 0, 0

    def next(self, size: int) -> list[int]:
        out = []
        while len(out) < size:
            if self.pos >= self.n:
                self.order, self.pos, self.epoch = self.rng.permutation(self.n), 0, self.epoch + 1
            take = min(size - len(out), self.n - self.pos)
            out.extend(int(i) for i in self.order[self.pos:self.pos + take])
            self.pos += take
        return out

    def state(self) -> tuple[dict, dict]:
        return {"pos": self.pos, "epoch": self.epoch, "rng": self.rng.bit_generator.state}, {"data_order": self.order}

    def load(self, meta: dict, arrays: dict):
        self.pos, self.epoch = meta["pos"], meta["epoch"]
        self.rng.bit_generator.state = meta["rng"]
        self.order = arrays["data_order"]


# ------------------------------------------------------------------------------ the loop

def train(cfg: TrainConfig, resume_from: tuple[dict, dict] | None = None, restart: bool = False,
          inputs: RunInputs | None = None) -> dict:
    """Run ESSA (see the module docstring). ``resume_from``: a checkpoint's (meta, arrays) to continue from;
    ``restart``: start over inside an existing run directory whose run stopped before its first checkpoint;
    ``inputs``: in-memory reward and rows (the Python API) instead of those the config names."""
    run_dir = Path(cfg.output_dir)
    fresh = resume_from is None and not restart
    if fresh:
        check_new_run_dir(run_dir, "train", resumable=True)
        created = not run_dir.exists()
        lock = start_run_dir(run_dir)
    else:
        lock = lock_run_dir(run_dir)
    remove_stale_temps(run_dir)
    try:  # a start that fails (data, model, reward, adapter) leaves the folder as it found it
        task, system_prompt, reward_fn, val_rows, train_rows = task_setup(cfg, inputs)
        val_metric = resolve_val_metric(cfg, task)
        test_rows = load_test_rows(cfg, task)
        max_new = cfg.generation.max_new_tokens
        sets = {"train": PromptSet([r["prompt"] for r in train_rows], max_new, "training", train_rows),
                "val": PromptSet([r["prompt"] for r in val_rows], max_new, "validation")}
        if test_rows is not None:
            sets["test"] = PromptSet([r["prompt"] for r in test_rows], max_new, "test")
        local = cfg.distributed.workers == 0
        # in process the worker scores with the reward already resolved here; Ray workers resolve their own copy
        engine = engine_settings(cfg)
        if engine.engine == "vllm":  # vLLM batches this many adapters at once: a whole generation
            engine.vllm = {"max_loras": cfg.popsize, **engine.vllm}
        spec = WorkerSpec(cfg.model, cfg.adapter, engine, cfg.alpha, cfg.clamp_min, cfg.balance,
                          system_prompt, sets,
                          reward=reward_fn if local else ((inputs and inputs.reward_fn) or cfg.reward or task.name),
                          reward_options={} if local else dict(cfg.reward_options),
                          reward_timeout=None if local else cfg.reward_timeout)
        pool = make_pool(spec, cfg.distributed)
        if fresh:
            mark_run_dir(run_dir, "train", to_dict(cfg))
    except BaseException:
        if "pool" in locals():
            pool.close()
        if fresh:
            abandon_run_dir(run_dir, created, lock)
        raise
    try:
        return run_loop(cfg, run_dir, pool, task, system_prompt, reward_fn, val_rows, train_rows, test_rows, val_metric,
                    resume_from)
    finally:
        pool.close()


def run_loop(cfg: TrainConfig, run_dir: Path, pool, task, system_prompt, reward_fn, val_rows, train_rows, test_rows,
         val_metric, resume_from) -> dict:
    """The ESSA loop of the module docstring; :func:`train` has set up the run directory, the data and the
    workers (``pool``: `essa.distributed`)."""
    from tqdm import tqdm

    from essa.strategies import DEFAULT_SIGMA0, make_strategy

    genome = pool.genome
    greedy_val = SamplingConfig(max_new_tokens=cfg.generation.max_new_tokens, stop=cfg.generation.stop)

    calibration_seconds = 0.0
    if cfg.sigma0 == "auto" and resume_from is None:
        t_cal = time.perf_counter()
        sigma0 = _calibrate(cfg, pool, len(train_rows), run_dir)
        calibration_seconds = time.perf_counter() - t_cal  # part of the run's wall-clock (and budget)
    elif cfg.sigma0 == "auto":  # resumed: the strategy state holds sigma; sigma0 is read from it below
        sigma0 = DEFAULT_SIGMA0
    else:
        sigma0 = cfg.sigma0 if cfg.sigma0 is not None else DEFAULT_SIGMA0
    strategy = make_strategy(cfg.strategy, genome.dimension, cfg.popsize, sigma0, cfg.seed, **cfg.strategy_opts)
    stream = DataStream(len(train_rows), cfg.seed)
    state = LoopState.start(genome.dimension, calibration_seconds)
    if resume_from is not None:
        meta, arrays = resume_from
        state = LoopState.from_checkpoint(meta["loop"], arrays)
        strategy.load_state_dict(meta["strategy"], {k[len("strategy/"):]: v for k, v in arrays.items() if k.startswith("strategy/")})
        stream.load(meta["data"], {"data_order": arrays["data_order"]})
        _truncate_jsonl(run_dir / "metrics.jsonl", state.generation)
        _truncate_jsonl(run_dir / "samples.jsonl", state.generation)
        print(f"essa: resuming {run_dir} at generation {state.generation}")

    writer = None
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(run_dir / "tb"), purge_step=state.generation or None)
        except ImportError:
            writer = None

    def validate(gen: int) -> dict[str, float]:
        """Validate the strategy mean (and the best candidate, if asked); keep the best by validation."""
        models = {"mean": np.asarray(strategy.mean, dtype=np.float64)} if gen else {"mean": np.zeros(genome.dimension)}
        if cfg.validate_best_candidate and gen:
            models["best_candidate"] = state.best_candidate
        outs, _ = pool.generate("val", np.stack(list(models.values())), greedy_val)
        fault_point("validation")
        scores = {}
        for (name, offset), per_prompt in zip(models.items(), outs):
            scores[name] = validation_score(task, val_metric, reward_fn, val_rows, [s[0].text for s in per_prompt])
            if state.selection.offer(scores[name], gen):
                state.best_offset = np.array(offset, dtype=np.float64)
        state.last_val_generation, state.last_val_wall = gen, time.perf_counter() - t_start
        return scores

    def log(record: dict):
        append_jsonl(run_dir / "metrics.jsonl", [record])
        if writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and v is not None and k != "generation" and math.isfinite(v):
                    writer.add_scalar(k.replace("val_", "val/").replace("fitness_", "fitness/"), v, record["generation"])
            writer.flush()

    def checkpoint():
        s_meta, s_arrays = strategy.state_dict()
        d_meta, d_arrays = stream.state()
        arrays = {**{f"strategy/{k}": v for k, v in s_arrays.items()}, **d_arrays, **state.arrays()}
        save_checkpoint(run_dir, {"loop": state.meta(), "strategy": s_meta, "data": d_meta}, arrays)

    t_start = time.perf_counter() - state.wall_seconds
    print(f"essa: genome dimension {genome.dimension} ({genome.info()['formula']}), strategy {cfg.strategy}, "
          f"popsize {cfg.popsize}, batch {cfg.batch_size}; validation = {len(val_rows)} held-out rows of "
          f"{task.name} train data (not test); generating on {pool.device}")
    if state.generation == 0 and resume_from is None:  # generation 0: the SFT adapter itself
        v = validate(0)
        log({"generation": 0, "val_mean": v["mean"], "wall_seconds": round(time.perf_counter() - t_start, 3),
             "tokens": state.tokens, "sigma": strategy.sigma})
        checkpoint()

    while state.generation < cfg.generations:
        if cfg.max_minutes is not None and time.perf_counter() - t_start > 60 * cfg.max_minutes:
            print(f"essa: time budget of {cfg.max_minutes} min reached")
            break
        gen = state.generation + 1
        # ask: K offsets; one batched generation of every (candidate, prompt, sample)
        X = strategy.ask()
        K = len(X)
        per_cand = [stream.next(cfg.batch_size)] * K if cfg.shared_batch else [stream.next(cfg.batch_size) for _ in range(K)]
        pairs = [(k, i) for k in range(K) for i in per_cand[k]]
        bar = tqdm(total=len(pairs), desc=f"gen {gen}/{cfg.generations}", unit="row", leave=False)
        t_gen = time.perf_counter()

        def progress(done, toks):
            bar.update(done // cfg.generation.num_samples - bar.n)
            if toks is not None:
                bar.set_postfix(tok_s=f"{toks / max(time.perf_counter() - t_gen, 1e-9):.0f}")

        # fitness: the mean reward of a candidate's completions (every sample scored; invalid = worst valid),
        # generated and scored by the workers
        try:
            fit = pool.fitness("train", X, pairs, cfg.generation, cfg.samples_per_generation, progress)
        finally:  # also on an error: the bar's line is cleared, so `essa: error:` starts its own line
            bar.close()
        fitness, invalid, any_valid = fit.values, fit.invalid, fit.any_valid
        # all equal (or no valid reward at all): no information; telling would move the mean in ask order
        flat = bool(np.ptp(fitness) == 0) or not any_valid
        if not flat:
            strategy.tell(X, fitness)
        gen_tokens = fit.tokens
        state.tokens += gen_tokens
        state.invalid_rewards += invalid
        top = int(np.argmax(fitness))
        if any_valid and fitness[top] > state.best_fitness:  # a generation without a valid reward never ranks
            state.best_fitness, state.best_candidate = float(fitness[top]), np.asarray(X[top], dtype=np.float64)
        state.generation = gen
        wall = time.perf_counter() - t_start
        record = {"generation": gen, "fitness_mean": float(fitness.mean()), "fitness_max": float(fitness.max()),
                  "fitness_min": float(fitness.min()), "fitness_std": float(fitness.std()), "sigma": float(strategy.sigma),
                  "tokens_generated": gen_tokens, "tokens": state.tokens, "invalid_rewards": invalid,
                  "tokens_per_second": round(gen_tokens / max(time.perf_counter() - t_gen, 1e-9), 1),
                  "wall_seconds": round(wall, 3), "epoch": stream.epoch, "flat_fitness": flat, "workers": pool.workers,
                  "wire_bytes_down": fit.wire_down, "wire_bytes_up": fit.wire_up}
        if gen % cfg.eval_every == 0 or gen == cfg.generations or (
                cfg.eval_every_seconds is not None and wall - state.last_val_wall >= cfg.eval_every_seconds):
            record.update({f"val_{name}": score for name, score in validate(gen).items()})
            record["best_val"] = state.selection.value
            record["wall_seconds"] = round(state.last_val_wall, 3)
        state.wall_seconds = time.perf_counter() - t_start
        append_jsonl(run_dir / "samples.jsonl", [
            {"generation": gen, "candidate": top, "prompt": train_rows[p]["prompt"], "completion": text, "reward": raw}
            for p, text, raw in fit.samples[top][:cfg.samples_per_generation]])
        log(record)
        print(f"essa: gen {gen}: fitness mean {record['fitness_mean']:.4f} max {record['fitness_max']:.4f} "
              f"sigma {record['sigma']:.4g}" + (f" val {record['val_mean']:.4f}" if "val_mean" in record else "")
              + f" ({record['tokens_per_second']:.0f} tok/s)")
        checkpoint()

    # the loop ended without validating its last generation (time budget): validate it now
    if state.generation > 0 and state.last_val_generation != state.generation:
        v = validate(state.generation)
        state.wall_seconds = time.perf_counter() - t_start
        log({"generation": state.generation, **{f"val_{name}": score for name, score in v.items()},
             "best_val": state.selection.value, "wall_seconds": round(state.wall_seconds, 3), "tokens": state.tokens,
             "final_validation": True})
        checkpoint()

    from essa.genome import export_adapter

    final_mean = np.asarray(strategy.mean, dtype=np.float64)
    best_offset = state.best_offset
    best_dir = export_adapter(genome, best_offset, run_dir / "adapters" / "best", cfg.clamp_min,
                              metadata={"selected_by": f"validation accuracy on {len(val_rows)} held-out train rows",
                                        "generation": state.selection.generation, "val_accuracy": state.selection.value})
    final_dir = export_adapter(genome, final_mean, run_dir / "adapters" / "final", cfg.clamp_min,
                               metadata={"generation": state.generation})
    summary = {"run_dir": str(run_dir), "generations": state.generation, "genome_dimension": genome.dimension,
               "val_metric": val_metric, "system_prompt": system_prompt,
               "best_val": state.selection.value, "best_val_generation": state.selection.generation,
               "selection_split": f"{len(val_rows)} rows held out from {task.name} RL/train data",
               "wall_seconds": round(state.wall_seconds, 2), "tokens_generated": state.tokens,
               "invalid_rewards": state.invalid_rewards, "adapters": {"best": str(best_dir), "final": str(final_dir)}}
    if test_rows is not None:
        outs, _ = pool.generate("test", np.stack([np.zeros(genome.dimension), best_offset, final_mean]), greedy_val)
        summary["test_metric"] = val_metric
        per_row = {}
        for name, per_prompt in zip(("sft", "best", "final"), outs):
            texts = [s[0].text for s in per_prompt]
            summary[f"test_{name}"], per_row[name] = scored_rows(task, val_metric, reward_fn, test_rows, texts)
            write_jsonl_atomic(({"prompt": r["prompt"], "completion": s[0].text} for r, s in zip(test_rows, per_prompt)),
                               run_dir / f"test-{name}.jsonl")
        if per_row["sft"] is not None:  # paired interval of the difference, when the metric is a mean over rows
            for name in ("best", "final"):
                summary[f"test_{name}_minus_sft"] = paired_bootstrap(per_row["sft"], per_row[name], seed=cfg.seed)
        if cfg.test_num_samples > 1 and task.name != "prompts":
            from essa.evaluate import sampled_metrics

            k = cfg.test_num_samples
            sampled, _ = pool.generate("test", np.stack([np.zeros(genome.dimension), best_offset, final_mean]),
                                       SamplingConfig(max_new_tokens=cfg.generation.max_new_tokens, temperature=0.6,
                                                      top_p=0.95, num_samples=k, seed=cfg.seed, stop=cfg.generation.stop))
            for name, per_prompt in zip(("sft", "best", "final"), sampled):
                for key, v in sampled_metrics(task, test_rows, per_prompt).items():
                    summary[f"test_{name}_{key}"] = v
        summary["test_n"] = len(test_rows)
    fault_point("summary")
    write_json(run_dir / "summary.json", summary)
    if writer is not None:
        writer.close()
    return summary


def _calibrate(cfg: TrainConfig, pool, n_train: int, run_dir: Path) -> float:
    """sigma0 'auto': the step whose first-generation candidates move the model by sigma_target_kl
    (measured by one worker, `essa.explore`)."""
    t0 = time.perf_counter()
    n = min(cfg.calibration_prompts, n_train)
    # the calibration prompts: seeded, disjoint from nothing in particular (training prompts only)
    idx = np.random.Generator(np.random.PCG64(cfg.seed + 777)).choice(n_train, n, replace=False)
    sigma, log = pool.calibrate("train", [int(i) for i in idx], cfg.sigma_target_kl, cfg.seed)
    chosen = min(log, key=lambda m: abs(m["sigma"] - sigma))
    record = {"sigma0": sigma, "target_kl": cfg.sigma_target_kl, "kl": chosen["kl"],
              "token_agreement": chosen["agreement"], "prompts": [int(i) for i in idx],
              "seconds": round(time.perf_counter() - t0, 2), "measurements": log}
    write_json(run_dir / "calibration.json", record)
    print(f"essa: sigma0 auto = {sigma:.4g} (target KL {cfg.sigma_target_kl:g} nats/token: measured {chosen['kl']:.3g}, "
          f"top-1 agreement with the SFT adapter {chosen['agreement']:.3f}; {record['seconds']:.0f} s, calibration.json)")
    return float(sigma)


def _truncate_jsonl(path: Path, generation: int):
    """Keep only records up to `generation` (lines written after the last checkpoint are redone; a line cut
    off by a kill is dropped)."""
    if not path.exists():
        return
    keep = [r for r in read_jsonl_lenient(path)[0] if isinstance(r.get("generation"), int) and r["generation"] <= generation]
    write_jsonl_atomic(keep, path)


def resume(run_dir: str, distributed: dict | None = None) -> dict:
    """Continue an interrupted run from its checkpoint, with the config it was started with (a run stopped
    before its first checkpoint starts over, in its folder); ``distributed``: fields of the `distributed`
    section to change (where generation runs never changes a run's results)."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not run_dir.is_dir() or run_kind(run_dir) != "train" or not cfg_path.exists():
        found = run_kind(run_dir) if run_dir.is_dir() else None
        raise EssaError(f"{run_dir} is not an `essa train` run directory" + (f" (it holds an essa {found} run)" if found else "")
                        + "; pass the output_dir of an `essa train` run")
    try:
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EssaError(f"{cfg_path} is damaged (not JSON); the run cannot be resumed: start a new run") from None
    data["output_dir"] = str(run_dir)  # a moved or copied run continues where it is, never at its old path
    if distributed:
        data["distributed"] = {**data.get("distributed", {}), **distributed}
    cfg = from_dict(TrainConfig, data)
    if not (run_dir / CHECKPOINT).exists():
        if (run_dir / "summary.json").exists():
            raise EssaError(f"{run_dir} holds a finished run without its {CHECKPOINT}; nothing to resume")
        print(f"essa: {run_dir} stopped before its first checkpoint; starting it over")
        with lock_run_dir(run_dir):  # not while another process runs it
            pass
        for name in ("metrics.jsonl", "samples.jsonl", "calibration.json"):
            (run_dir / name).unlink(missing_ok=True)
        return train(cfg, restart=True)
    return train(cfg, resume_from=load_checkpoint(run_dir))
