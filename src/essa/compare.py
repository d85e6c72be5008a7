"""`essa compare`: ESSA vs GRPO from the same SFT adapter, for the same wall-clock budget.

The two methods run one after the other in this process on the same device: first ``essa train``
(:func:`essa.trainer.train`), then ``essa grpo`` (:func:`essa.grpo.run_grpo`), each stopped by the same
``budget_minutes`` of training wall-clock time (model loading, the final test and the SFT warm start
are not part of the budget). Both validate on the same held-out rows (carved, seeded, from the RL
data), with the same greedy evaluator, at the start, every ``eval_every_seconds`` of wall-clock time
and at the end; both then test their best-by-validation and final adapters on the same test rows.

Config (one YAML file)::

    # shared section: any field of `essa train` (TrainConfig) and/or `essa grpo` (GRPORunConfig);
    # each key goes to every method that has it (fields: `essa config-help train`, essa.grpo.GRPORunConfig)
    model: smollm2-135m-instruct
    adapter: runs/sft/adapter          # the SFT adapter both start from
    task: gsm8k
    val_size: 200
    test_limit: null
    generation: {max_new_tokens: 256}  # must agree for both methods (validation decoding)
    eval_every_seconds: 60             # default: budget / 10
    # compare's own keys
    output_dir: runs/compare           # OUTPUT_DIR/essa and OUTPUT_DIR/grpo are the two run directories
    budget_minutes: 30                 # or --budget-minutes (wins over the file)
    threshold: null                    # validation accuracy for time-to-threshold (null: the lower best)
    sft_config: null                   # essa_sft_config.json of the SFT run (default: the adapter's own)
    essa: {popsize: 24, batch_size: 100}             # ESSA-only settings
    grpo: {lr: 1.0e-5, num_generations: 8}           # GRPO-only settings

Settings that decide what is compared (model, adapter, task, reward, system prompt, data, val_size,
test_limit, seed, quantization of the evaluator, validation length and stop strings) must end up equal
for both methods; a section that changes one of them is an error. Unless a section sets them, ESSA
runs with ``generations`` and ``eval_every`` (generations) unbounded and GRPO with ``max_steps``
unbounded and ``eval_every_steps`` null, so the budget ends both and validation is by time only.

The budget is checked between iterations (ESSA: before each generation; GRPO: after each optimizer
step), so a run may overshoot it by one iteration plus a validation. Peak memory: on a GPU,
``torch.cuda.max_memory_allocated`` reset before each method; on CPU the process's peak RSS (VmHWM,
reset before each method where Linux allows), which includes what the process already held.

Outputs in OUTPUT_DIR: ``comparison.json`` (one section per method: best validation, final and
test accuracy, time and tokens to threshold, tokens generated, peak memory, ...), ``comparison.png``
(validation accuracy vs wall-clock time and vs generated tokens; below, each method's training reward), ``compare-config.json``, and the
two run directories.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import re
import time
from pathlib import Path

from essa import EssaError

#: compare's own keys in the YAML file (everything else is the shared section)
OWN_KEYS = ("output_dir", "budget_minutes", "threshold", "sft_config", "essa", "grpo")
#: fields that must be equal in both methods' configs for the comparison to mean anything
SAME_FOR_BOTH = ("model", "adapter", "task", "reward", "system_prompt", "train_data", "val_size", "val_metric", "test_data", "test_limit",
                 "seed", "device", "dtype", "quantization")
#: set by compare itself
FORCED = ("output_dir", "max_minutes")
UNBOUNDED = 1_000_000


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def build_configs(data: dict, budget_minutes: float | None = None):
    """(own settings, TrainConfig, GRPORunConfig) from a compare mapping (see the module docstring)."""
    from essa.config import from_dict
    from essa.grpo import GRPORunConfig
    from essa.trainer import TrainConfig

    data = dict(data)
    own = {k: data.pop(k) for k in OWN_KEYS if k in data}
    budget = budget_minutes if budget_minutes is not None else own.get("budget_minutes")
    if budget is None:
        raise EssaError("essa compare needs a budget: pass --budget-minutes M or set budget_minutes in the config")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
        raise EssaError(f"budget_minutes must be a positive number of minutes, got {budget!r}")
    own["budget_minutes"] = float(budget)
    own.setdefault("output_dir", "runs/compare")
    for section in ("essa", "grpo"):
        value = own.get(section) or {}
        if not isinstance(value, dict):
            raise EssaError(f"`{section}:` must be a mapping of {section}-only settings, got {value!r}")
        own[section] = value
    threshold = own.get("threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))):
        raise EssaError(f"threshold must be a validation accuracy (number) or null, got {threshold!r}")

    essa_f, grpo_f = _fields(TrainConfig), _fields(GRPORunConfig)
    for key in data:
        if key not in essa_f and key not in grpo_f:
            raise EssaError(f"unknown config key {key!r}; shared keys are fields of `essa train` or `essa grpo` "
                            f"({', '.join(sorted(essa_f | grpo_f))}), plus {', '.join(OWN_KEYS)}")
    for section in ("essa", "grpo"):
        for key in own[section]:
            if key in FORCED:
                raise EssaError(f"{section}.{key} is set by essa compare; use the top-level output_dir/budget_minutes")
    data.setdefault("eval_every_seconds", own["budget_minutes"] * 60 / 10)
    out = Path(own["output_dir"])

    def arm(names, section, defaults, subdir):
        d = {k: v for k, v in data.items() if k in names}
        for k, v in defaults.items():
            d.setdefault(k, v)
        for k, v in own[section].items():  # a section's mapping (e.g. generation) refines the shared one
            d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
        d.update(output_dir=str(out / subdir), max_minutes=own["budget_minutes"])
        return d

    def build(cls, section, defaults):
        try:
            return from_dict(cls, arm(_fields(cls), section, defaults, section))
        except EssaError as e:
            raise EssaError(f"{section} settings: {e}") from None

    essa_cfg = build(TrainConfig, "essa", {"generations": UNBOUNDED, "eval_every": UNBOUNDED})
    grpo_cfg = build(GRPORunConfig, "grpo", {"max_steps": UNBOUNDED, "eval_every_steps": None})
    if essa_cfg.validate_best_candidate:
        raise EssaError("essa.validate_best_candidate would make ESSA validate two models per validation where GRPO "
                        "validates one; remove it so both arms validate the same number of models")
    for key in SAME_FOR_BOTH + ("eval_every_seconds",):
        a, b = getattr(essa_cfg, key), getattr(grpo_cfg, key)
        if a != b:
            raise EssaError(f"{key} differs between the methods ({a!r} vs {b!r}); set it once in the shared section")
    for key in ("max_new_tokens", "stop"):
        a, b = getattr(essa_cfg.generation, key), getattr(grpo_cfg.generation, key)
        if a != b:
            raise EssaError(f"generation.{key} differs between the methods ({a!r} vs {b!r}); validation must decode "
                            f"the same way: set it in the shared `generation:` section")
    return own, essa_cfg, grpo_cfg


# ------------------------------------------------------------------------------ measurements

class PeakMemory:
    """Peak memory of one method: CUDA allocated tensors on a GPU, else the process's peak RSS."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def reset(self):
        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.rss_reset = True
        except OSError:
            self.rss_reset = False

    def read(self) -> dict:
        if self.cuda:
            import torch

            return {"peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                    "peak_memory_kind": "GPU: torch.cuda.max_memory_allocated during this method (tensors)"}
        try:
            kb = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
            kind = ("CPU: peak RSS of the process during this method (VmHWM, reset before it; includes the "
                    "Python runtime and memory still held from earlier work)" if self.rss_reset
                    else "CPU: peak RSS of the process since it started (VmHWM)")
        except (OSError, AttributeError):
            import resource

            kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            kind = "CPU: peak RSS of the process since it started (ru_maxrss)"
        return {"peak_memory_gb": round(kb / 2**20, 3), "peak_memory_kind": kind}


def validation_curve(run_dir: str | Path) -> list[dict]:
    """Validation points of a run: wall_seconds, tokens, val (the run's current model) and score
    (the best model validated at that point: for ESSA the max of the mean and the best candidate)."""
    from essa.report import read_metrics

    points = []
    for r in read_metrics(run_dir):
        if "val_mean" not in r:
            continue
        score = max(v for v in (r.get("val_mean"), r.get("val_best_candidate")) if v is not None)
        points.append({"generation": r["generation"], "wall_seconds": r["wall_seconds"], "tokens": r.get("tokens", 0),
                       "val": r["val_mean"], "val_best_candidate": r.get("val_best_candidate"), "score": score})
    return points


def first_reaching(points: list[dict], threshold: float) -> dict | None:
    for p in points:
        if p["score"] >= threshold - 1e-12:
            return p
    return None


def reward_curve(run_dir: str | Path) -> list[dict]:
    """Training reward per iteration: ESSA's population mean fitness, GRPO's rollout reward mean."""
    from essa.report import read_metrics

    out = []
    for r in read_metrics(run_dir):
        v = r.get("fitness_mean", r.get("reward_mean"))
        if v is not None:
            out.append({"wall_seconds": r["wall_seconds"], "tokens": r.get("tokens", 0), "reward": v})
    return out


def plot(curves: dict[str, list[dict]], rewards: dict[str, list[dict]], threshold: float, budget_minutes: float,
         path: Path):
    """Top: validation accuracy vs wall-clock and vs generated tokens; bottom: the training reward."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex="col")
    style = {"essa": ("tab:blue", "o-", "ESSA"), "grpo": ("tab:red", "s-", "GRPO")}
    for col, (key, label, scale) in enumerate((("wall_seconds", "training wall-clock (minutes)", 1 / 60),
                                               ("tokens", "generated tokens (training rollouts)", 1))):
        ax = axes[0, col]
        for name, pts in curves.items():
            color, fmt, legend = style.get(name, (None, "o-", name))
            ax.plot([p[key] * scale for p in pts], [p["val"] for p in pts], fmt, color=color, ms=4,
                    label=f"{legend} ({'strategy mean' if name == 'essa' else 'current LoRA'})")
            bc = [p for p in pts if p.get("val_best_candidate") is not None]
            if bc:
                ax.plot([p[key] * scale for p in bc], [p["val_best_candidate"] for p in bc], "--", color=color,
                        alpha=0.6, label=f"{legend} (best candidate so far)")
        ax.axhline(threshold, color="gray", ls=":", lw=1, label=f"threshold {threshold:.3f}")
        ax.set_ylabel("validation accuracy (greedy)"), ax.grid(alpha=0.3), ax.legend(loc="best", fontsize=8)
        ax = axes[1, col]
        for name, pts in rewards.items():
            color, _, legend = style.get(name, (None, "o-", name))
            ax.plot([p[key] * scale for p in pts], [p["reward"] for p in pts], "-", color=color, lw=1,
                    label=f"{legend} ({'population mean fitness' if name == 'essa' else 'rollout mean reward'})")
        ax.set_xlabel(label), ax.set_ylabel("training reward (levels not comparable)")
        ax.grid(alpha=0.3), ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"ESSA vs GRPO, {budget_minutes:g} min budget each, same SFT start and validation split")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sft_info(own: dict, adapter: str) -> dict:
    path = own.get("sft_config")
    candidates = [Path(path)] if path else [Path(adapter) / "essa_sft_config.json"]
    if path and Path(path).is_dir():
        candidates = [Path(path) / "essa_sft_config.json"]
    for c in candidates:
        if c.is_file():
            try:
                meta = json.loads(c.read_text())
            except json.JSONDecodeError:
                raise EssaError(f"{c} is not valid JSON; pass the essa_sft_config.json written by `essa sft`") from None
            return {"wall_seconds": meta.get("wall_time_s"), "source": str(c), "included_in_budget": False}
    if path:
        raise EssaError(f"sft_config {path!r} does not exist; pass the essa_sft_config.json of the SFT run (or its folder)")
    return {"wall_seconds": None, "source": None, "included_in_budget": False,
            "note": "no essa_sft_config.json next to the adapter; set sft_config to report the SFT time"}


# ------------------------------------------------------------------------------ the comparison

def run_compare(data: dict, budget_minutes: float | None = None) -> dict:
    """Run both methods for the same budget and write comparison.json and comparison.png."""
    from essa.config import to_dict
    from essa.grpo import import_trl, run_grpo
    from essa.models import pick_device
    from essa.trainer import train

    own, essa_cfg, grpo_cfg = build_configs(data, budget_minutes)
    import_trl()  # fail before the ESSA half runs, not after
    adapter = Path(essa_cfg.adapter)
    if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
        raise EssaError(f"{adapter} is not a PEFT adapter folder (need adapter_config.json and "
                        f"adapter_model.safetensors); pass the output of `essa sft`")
    out = Path(own["output_dir"])
    for p in (out / "comparison.json", out / "essa", out / "grpo"):
        if p.exists():
            raise EssaError(f"{out} already holds a comparison ({p.name} exists); choose another output_dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare-config.json").write_text(json.dumps(
        {k: v for k, v in own.items() if k not in ("essa", "grpo")} | {"essa": to_dict(essa_cfg), "grpo": to_dict(grpo_cfg)},
        indent=2))
    sft = _sft_info(own, essa_cfg.adapter)
    device = pick_device(essa_cfg.device)
    mem = PeakMemory(device)

    results, summaries = {}, {}
    for name, fn, cfg, unit in (("essa", train, essa_cfg, "generation"), ("grpo", run_grpo, grpo_cfg, "optimizer step")):
        print(f"essa compare: {name} for {own['budget_minutes']:g} min on {device}")
        mem.reset()
        t0 = time.perf_counter()
        summary = fn(cfg)
        total = time.perf_counter() - t0
        summaries[name] = summary
        results[name] = {"run_dir": summary["run_dir"], "iterations": summary["generations"], "iteration_unit": unit,
                         "training_wall_seconds": summary["wall_seconds"], "total_seconds": round(total, 2),
                         "tokens_generated": summary["tokens_generated"], **mem.read()}
        gc.collect()

    curves = {name: validation_curve(summaries[name]["run_dir"]) for name in ("essa", "grpo")}
    best = {name: max((p["score"] for p in pts), default=-math.inf) for name, pts in curves.items()}
    threshold = own.get("threshold")
    threshold_source = "config"
    if threshold is None:
        threshold, threshold_source = min(best.values()), "lower of the two best validation scores"
    for name, pts in curves.items():
        s, r = summaries[name], results[name]
        hit = first_reaching(pts, threshold)
        best_pt = max(pts, key=lambda p: p["score"]) if pts else None
        r.update({
            "best_val": s["best_val"], "best_val_wall_seconds": best_pt["wall_seconds"] if best_pt else None,
            "best_val_tokens": best_pt["tokens"] if best_pt else None,
            "final_val": pts[-1]["val"] if pts else None, "validations": len(pts),
            "time_to_threshold_seconds": hit["wall_seconds"] if hit else None,
            "tokens_to_threshold": hit["tokens"] if hit else None,
            **{k: s[k] for k in ("test_sft", "test_best", "test_final", "test_n") if k in s},
            "curve": [{k: p[k] for k in ("wall_seconds", "tokens", "val", "score")} for p in pts],
        })
    png = out / "comparison.png"
    plot(curves, {name: reward_curve(summaries[name]["run_dir"]) for name in summaries}, threshold,
         own["budget_minutes"], png)
    report = {
        "budget_minutes": own["budget_minutes"], "eval_every_seconds": essa_cfg.eval_every_seconds,
        "device": str(device), "threshold": threshold, "threshold_source": threshold_source,
        "time_to_threshold": "training wall-clock seconds at the first validation whose score reached the threshold "
                             "(score: the best validated model at that time; ESSA: max of strategy mean and best candidate)",
        "validation": {"rows": essa_cfg.val_size, "split": f"held out (seed {essa_cfg.seed + 12345}) from {essa_cfg.task} RL data",
                       "decoding": f"greedy, max_new_tokens {essa_cfg.generation.max_new_tokens}"},
        "test_limit": essa_cfg.test_limit, "sft": sft, "order": ["essa", "grpo"],
        "methods": results, "plot": str(png),
    }
    (out / "comparison.json").write_text(json.dumps(report, indent=2))
    return report
