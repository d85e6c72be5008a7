"""Evaluation: generate with the population engine, score with the task, write per-example results."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from essa import EssaError
from essa.chat import chat_prompts
from essa.config import help_field
from essa.distributed import DistributedConfig, PromptSet, WorkerSpec, make_pool
from essa.engine import EngineConfig, PopulationEngine, engine_settings
from essa.files import write_jsonl_atomic
from essa.rewards import score_completions
from essa.sampling import SamplingConfig
from essa.tasks import Task, get_task, load_rows


@dataclass
class EvalConfig(EngineConfig):
    """`essa eval`: score a model (optionally with an adapter) on a task's test split."""

    model: str = help_field("smollm2-135m-instruct", "base model: alias, hub id or local folder")
    adapter: str | None = help_field(None, "PEFT LoRA adapter folder (SFT output or exported genome); none = base model")
    task: str = help_field("gsm8k", "gsm8k | math500 | ifeval")
    data: str | None = help_field(None, "split name of the task, local .jsonl or HF dataset id (default: the task's test split)")
    limit: int | None = help_field(None, "evaluate only the first N examples")
    max_new_tokens: int = help_field(512, "maximum tokens per completion")
    system_prompt: str | None = help_field("task", "system prompt; 'task' = the task's default, null = none")
    output: str | None = help_field(None, "per-example jsonl path (default: eval-<task>.jsonl in the current folder)")
    overwrite: bool = help_field(False, "replace an existing output file (otherwise an existing file is an error)")
    reward: str | None = help_field(None, "also report reward_mean, the mean of this reward over the greedy completions "
                                    "(a reward spec as in `essa train`; needed for the prompts task)")
    num_samples: int = help_field(1, "k > 1: also sample k completions per prompt and report avg@k and pass@k beside greedy accuracy")
    temperature: float = help_field(0.6, "sampling temperature of the k samples (num_samples > 1)")
    top_p: float = help_field(0.95, "nucleus sampling of the k samples (num_samples > 1)")
    seed: int = help_field(0, "seed of the counter-based sampler (num_samples > 1)")
    distributed: DistributedConfig = field(default_factory=DistributedConfig,
                                           metadata={"help": "generation on Ray workers (default: in this process)"})

    def validate(self):
        self.validate_engine()
        if self.limit is not None and self.limit < 1:
            raise EssaError(f"limit must be >= 1 (or omitted for all examples), got {self.limit}")
        if self.max_new_tokens < 1:
            raise EssaError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.num_samples < 1 or not (self.temperature > 0) or not (0 < self.top_p <= 1):
            raise EssaError(f"num_samples must be >= 1, temperature > 0 and 0 < top_p <= 1 (got {self.num_samples}, "
                            f"{self.temperature}, {self.top_p}); e.g. --num-samples 8 --temperature 0.6 --top-p 0.95")


def resolve_system_prompt(task: Task, value: str | None) -> str | None:
    return task.system_prompt if value == "task" else value


def validation_score(task, metric: str, reward_fn, rows: list[dict], texts: list[str]) -> float:
    """The number validation selects by: the mean reward (``metric='reward'``; invalid values are left
    out, none valid = -inf, so such a model never ranks) or a metric of the task's evaluation."""
    return scored_rows(task, metric, reward_fn, rows, texts)[0]


def scored_rows(task, metric: str, reward_fn, rows: list[dict], texts: list[str]) -> tuple[float, list[float] | None]:
    """(:func:`validation_score`, its per-row values) from one scoring pass. The per-row values (NaN where a
    reward was invalid) are None when the metric is not a mean over rows (IFEval's instruction-level ratios)."""
    if metric == "reward":
        _, values, _ = score_completions(reward_fn, rows, texts)
        per_row = [float(v) if math.isfinite(v) else math.nan for v in values]
        valid = [v for v in per_row if math.isfinite(v)]
        return (float(sum(valid) / len(valid)) if valid else -math.inf), per_row
    metrics = task.evaluate(rows, texts)
    if metric not in metrics or isinstance(metrics[metric], bool) or not isinstance(metrics[metric], (int, float)):
        raise EssaError(f"val_metric {metric!r} is not a metric of task {task.name!r}; use 'reward' or one of: "
                        f"{', '.join(k for k, v in metrics.items() if isinstance(v, float))}")
    return float(metrics[metric]), (row_scores(metrics) if metric == "accuracy" else None)


def paired_bootstrap(a, b, draws: int = 10_000, seed: int = 0, statistic=None) -> dict:
    """statistic(b) − statistic(a) over paired rows, and its 95 % percentile interval (rows resampled in
    pairs, 10,000 draws). Default: a and b are per-row values, the statistic is their mean, and pairs with a
    NaN are left out. ``statistic(data, idx)`` (a and b then any data with ``n`` rows, e.g. a dict of
    per-row arrays) computes the statistic on rows ``idx``, for ratios such as IFEval's instruction-level
    accuracy. ``significant``: the interval is above zero."""
    import numpy as np

    if statistic is None:
        a, b = np.asarray(a, float), np.asarray(b, float)
        keep = np.isfinite(a) & np.isfinite(b)
        a, b = a[keep], b[keep]
        statistic = lambda x, idx: x[idx].mean(axis=-1)  # noqa: E731
        n = int(a.size)
    else:
        n = len(next(iter(a.values()))) if isinstance(a, dict) else len(a)
    if n == 0:
        return {"diff": math.nan, "ci95": [math.nan, math.nan], "n": 0, "significant": False}
    idx = np.random.default_rng(seed).integers(0, n, size=(draws, n))
    diffs = np.array([statistic(b, i) - statistic(a, i) for i in idx])
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    every = np.arange(n)
    return {"diff": round(float(statistic(b, every) - statistic(a, every)), 4),
            "ci95": [round(float(lo), 4), round(float(hi), 4)], "n": n, "significant": bool(lo > 0)}


@dataclass
class Selection:
    """Best by validation: the highest validation score so far and the generation (or step) that reached it;
    a tie keeps the earlier one. `essa train` and `essa grpo` select their `adapters/best` with it."""

    value: float = -math.inf
    generation: int | None = None

    def offer(self, value: float, generation: int) -> bool:
        """Take ``value`` if it beats the best so far; True when it did."""
        if value > self.value:
            self.value, self.generation = float(value), generation
            return True
        return False


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021): 1 − C(n−c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def row_scores(metrics: dict) -> list[float]:
    """Per-row correctness of a task evaluation (its ``scores``; IFEval: prompt-level strict)."""
    if "scores" in metrics:
        return [float(x) for x in metrics["scores"]]
    return [float(r["strict_all"]) for r in metrics["results"]]


def sampled_metrics(task: Task, rows: list[dict], per_prompt: list[list]) -> dict:
    """avg@k (every float metric of the task averaged over the k samples) and pass@k for k = 1, 2, 4, …, n.

    per_prompt[p][s]: completion s of prompt p. A row counts as correct when its score is ≥ 0.5.
    """
    n = len(per_prompt[0])
    per_sample = [task.evaluate(rows, [samples[s].text for samples in per_prompt]) for s in range(n)]
    out = {}
    for key, v in per_sample[0].items():
        if isinstance(v, float) or (isinstance(v, int) and key != "n" and not isinstance(v, bool)):
            out[f"avg@{n}" + ("" if key == "accuracy" else f"/{key}")] = sum(m[key] for m in per_sample) / n
    correct = [sum(row_scores(m)[p] >= 0.5 for m in per_sample) for p in range(len(rows))]
    ks = sorted({k for k in (1, 2, 4, 8, 16, 32, 64) if k <= n} | {n})
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / max(1, len(rows))
    return out


def generate_and_score(engine: PopulationEngine, task: Task, rows: list[dict], candidates=None,
                       sampling: SamplingConfig | None = None, system_prompt: str | None = None,
                       progress=None):
    """Per candidate: (metrics dict, completions list). candidates None = the engine's adapter as is."""
    prompt_ids = chat_prompts(engine.tokenizer, [r["prompt"] for r in rows], system_prompt)
    out = engine.generate(prompt_ids, candidates, sampling or SamplingConfig(), progress=progress)
    results = []
    for per_prompt in out:
        completions = [samples[0] for samples in per_prompt]
        metrics = task.evaluate(rows, [c.text for c in completions])
        results.append((metrics, completions))
    return results


def run_eval(cfg: EvalConfig) -> dict:
    from tqdm import tqdm

    task = get_task(cfg.task)
    source = cfg.data or task.test_split
    if source is None:
        raise EssaError(f"task {cfg.task!r} has no test split; pass --data FILE.jsonl (and --reward for a score)")
    out_path = Path(cfg.output or f"eval-{cfg.task}.jsonl")
    if out_path.is_dir() or not out_path.parent.is_dir() or not os.access(out_path.parent, os.W_OK):
        raise EssaError(f"cannot write {out_path} (a folder, or its folder is missing or not writable); pass --output "
                        f"with a writable file path")
    if out_path.exists() and not cfg.overwrite:
        raise EssaError(f"{out_path} exists (an earlier evaluation); pass --output NEW.jsonl, or --overwrite true to replace it")
    rows = load_rows(task, source, limit=cfg.limit)
    system_prompt = resolve_system_prompt(task, cfg.system_prompt)
    spec = WorkerSpec(cfg.model, cfg.adapter, engine_settings(cfg), system_prompt=system_prompt,
                      prompt_sets={"eval": PromptSet([r["prompt"] for r in rows], cfg.max_new_tokens, "evaluation")})
    pool = make_pool(spec, cfg.distributed)
    bar = None
    try:
        t0 = time.perf_counter()
        bar = tqdm(total=len(rows), desc=f"eval {cfg.task}", unit="ex")
        progress = lambda done, toks: (bar.update(done - bar.n), bar.set_postfix(tok=toks))  # noqa: E731
        ((per_prompt,), tokens) = pool.generate("eval", None, SamplingConfig(max_new_tokens=cfg.max_new_tokens), progress)
        bar.close()
        completions = [samples[0] for samples in per_prompt]
        metrics = task.evaluate(rows, [c.text for c in completions])
        sampled = {}
        if cfg.reward is not None:
            from essa.rewards import resolve_reward

            fn = resolve_reward(cfg.reward, device=cfg.device, system_prompt=system_prompt)
            sampled["reward_mean"] = validation_score(task, "reward", fn, rows, [c.text for c in completions])
        if cfg.num_samples > 1:
            bar = tqdm(total=len(rows) * cfg.num_samples, desc=f"eval {cfg.task} x{cfg.num_samples} samples", unit="row")
            progress = lambda done, toks: (bar.update(done - bar.n), bar.set_postfix(tok=toks))  # noqa: E731
            ((per_prompt,), more) = pool.generate("eval", None, SamplingConfig(
                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                num_samples=cfg.num_samples, seed=cfg.seed), progress=progress)
            tokens += more
            bar.close()
            sampled.update({"sampling": {"num_samples": cfg.num_samples, "temperature": cfg.temperature,
                                         "top_p": cfg.top_p, "seed": cfg.seed}, **sampled_metrics(task, rows, per_prompt)})
        wall = time.perf_counter() - t0
    finally:
        if bar is not None:  # closed (idempotent) so an error line starts its own line
            bar.close()
        pool.close()
    per_example = metrics.pop("results", None) or [{} for _ in rows]
    scores = metrics.pop("scores", [None] * len(rows))
    write_jsonl_atomic(({**{k: v for k, v in r.items()}, "completion": c.text, "finish_reason": c.finish_reason,
                         "score": s, **extra}
                        for r, c, s, extra in zip(rows, completions, scores, per_example)), out_path)
    summary = {"task": cfg.task, "model": cfg.model, "adapter": cfg.adapter, "data": source,
               "system_prompt": system_prompt, **metrics, **sampled,
               "wall_seconds": round(wall, 2), "generated_tokens": tokens,
               "tokens_per_second": round(tokens / max(wall, 1e-9), 1),
               "device": pool.device, "quantization": cfg.quantization, "output": str(out_path)}
    return summary
