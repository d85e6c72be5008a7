"""A Python API shaped like TRL's GRPO one, so a GRPO user switches in a few lines::

    from essa import ESSAConfig, ESSATrainer            # instead of: from trl import GRPOConfig, GRPOTrainer

    def reward_len(completions, **kwargs):              # TRL-signature reward functions, unchanged
        return [-abs(20 - len(c)) for c in completions]

    args = ESSAConfig(output_dir="runs/essa-api", generations=20, popsize=16, batch_size=32)
    trainer = ESSATrainer(model="runs/sft", reward_funcs=reward_len, train_dataset=dataset, args=args)
    trainer.train()
    trainer.save_model("runs/essa-api/model")

Differences from TRL, by design: ``model`` is the SFT LoRA adapter folder (ESSA searches the singular values
of an adapter; its ``adapter_config.json`` names the base model), or a base model name with
``args.adapter``; a PeftModel object is saved first (``model.save_pretrained(DIR)``, then pass DIR).
Prompts are wrapped in the model's chat template, with a system turn when the conversational prompts
carry one (or ``args.system_prompt``). Reward functions are called as TRL calls them: ``prompts`` and
``completions`` as text for standard datasets, as message lists for conversational ones, and every
other column as a keyword list. ``eval_dataset`` is the validation split that selects the exported
model (default: ``val_size`` rows carved from ``train_dataset``).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from essa import EssaError
from essa.checkpoint import load_checkpoint
from essa.config import from_dict, help_field, to_dict
from essa.files import install_dir, temp_dir_beside
from essa.rewards import combine_rewards, resolve_reward
from essa.trainer import RunInputs, TrainConfig, train


@dataclass
class ESSAConfig(TrainConfig):
    """Arguments of :class:`ESSATrainer`: every `essa train` field (``essa config-help train``), with the
    defaults of prompt-only data aligned to reward functions (TRL's setting)."""

    task: str = help_field("prompts", "task whose metrics validation may use; 'prompts' = rows need only a prompt "
                           "and validation is the mean reward (as TRL's GRPO)")
    system_prompt: str | None = help_field(None, "system prompt of every chat (null = none, or the system message "
                                           "of conversational prompts)")
    output_dir: str = help_field("runs/essa-api", "run directory: metrics, checkpoints, adapters, summary")
    reward_weights: list[float] | None = help_field(None, "weight of each reward function (default: 1.0 each)")
    test_limit: int | None = help_field(0, "test rows of the final report (0 = none: the API has no test split)")


def _text_rows(dataset, what: str) -> tuple[list[dict], str | None, bool]:
    """(rows with a text 'prompt' and the other columns, the system prompt, conversational?)."""
    if dataset is None:
        return [], None, False
    records = [dict(r) for r in dataset]
    if not records:
        raise EssaError(f"{what} is empty; pass a dataset with a 'prompt' column")
    rows, systems, conversational = [], set(), False
    for i, rec in enumerate(records):
        prompt = rec.get("prompt")
        if isinstance(prompt, list):  # conversational: [{"role": ..., "content": ...}, ...]
            conversational = True
            users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
            systems.add(next((m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "system"), None))
            if not users or not isinstance(users[-1], str):
                raise EssaError(f"{what} row {i}: the conversational prompt has no user message; end it with "
                                f"{{'role': 'user', 'content': ...}}")
            rows.append({**rec, "prompt": users[-1], "essa_messages": prompt})
        elif isinstance(prompt, str) and prompt.strip():
            rows.append(rec)
        else:
            raise EssaError(f"{what} row {i} has no 'prompt' (a string, or a list of chat messages); fields: {sorted(rec)}")
    if len(systems) > 1:
        raise EssaError(f"{what}: conversational prompts carry {len(systems)} different system messages; ESSA uses one "
                        f"system prompt per run (set args.system_prompt)")
    return rows, (systems.pop() if systems else None), conversational


def _trl_reward(fn: Callable, conversational: bool) -> Callable:
    """A TRL reward called with essa's text prompts/completions: conversational datasets get message lists back."""
    def reward(prompts, completions, essa_messages=None, **columns):
        if conversational:
            prompts = essa_messages
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        return fn(prompts=prompts, completions=completions, **columns)

    reward.__name__ = getattr(fn, "__name__", "reward")
    return reward


def _spec_of(fn) -> str:
    """What config.json records for an in-memory reward: 'module:function' when importable."""
    if isinstance(fn, str):
        return fn
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None) or getattr(fn, "__name__", "reward")
    if module and module != "__main__" and "<" not in name:
        return f"{module}:{name}"
    return f"<in-memory reward {name}: resume through ESSATrainer.train(resume_from_checkpoint=True)>"


class ESSATrainer:
    """ESSA with TRL's trainer shape: ``ESSATrainer(model, reward_funcs, train_dataset, eval_dataset, args)``,
    then ``train()`` and ``save_model(dir)``."""

    def __init__(self, model, reward_funcs: Callable | str | Sequence[Callable | str], train_dataset, eval_dataset=None,
                 args: ESSAConfig | None = None):
        # re-built through the typed config loader: every field checked (one-line errors), nested dicts accepted
        args = from_dict(type(args), to_dict(args), validate=False) if args is not None else ESSAConfig()
        if not isinstance(model, (str, Path)):
            raise EssaError("model must be an SFT LoRA adapter folder or a model name (with args.adapter); save a "
                            "PeftModel with model.save_pretrained(DIR) and pass DIR")
        model = str(model)
        if (Path(model) / "adapter_config.json").is_file():
            base = json.loads((Path(model) / "adapter_config.json").read_text()).get("base_model_name_or_path")
            if not base:
                raise EssaError(f"{model}/adapter_config.json names no base_model_name_or_path; pass the base model "
                                f"as model and the adapter as args.adapter")
            args.model, args.adapter = base, model
        else:
            args.model = model
        args.validate()
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        weights = args.reward_weights or [1.0] * len(funcs)
        if len(weights) != len(funcs):
            raise EssaError(f"{len(funcs)} reward functions but {len(weights)} reward_weights; give one weight each")
        train_rows, system, conversational = _text_rows(train_dataset, "train_dataset")
        val_rows, val_system, _ = _text_rows(eval_dataset, "eval_dataset")
        if args.system_prompt is None:
            args.system_prompt = system or val_system
        resolved = [_trl_reward(f, conversational) if callable(f) else resolve_reward(f, device=args.device) for f in funcs]
        reward = resolved[0] if len(resolved) == 1 and weights[0] == 1.0 else combine_rewards(zip(resolved, weights))
        args.reward = _spec_of(funcs[0]) if len(funcs) == 1 else [{"reward": _spec_of(f), "weight": w}
                                                                  for f, w in zip(funcs, weights)]
        if val_rows:
            args.val_size = len(val_rows)
        self.args = args
        self.inputs = RunInputs(reward_fn=reward, train_rows=train_rows, val_rows=val_rows or None)
        self.summary: dict | None = None

    def train(self, resume_from_checkpoint: bool = False) -> dict:
        """Run ESSA; returns the summary (also in OUTPUT_DIR/summary.json). ``resume_from_checkpoint``:
        continue the interrupted run in ``args.output_dir``."""
        resume = load_checkpoint(Path(self.args.output_dir)) if resume_from_checkpoint else None
        self.summary = train(self.args, resume_from=resume, inputs=self.inputs)
        return self.summary

    def save_model(self, output_dir: str | None = None, which: str = "best") -> Path:
        """Copy the exported adapter (``best`` by validation, or ``final`` = the last strategy mean) to
        ``output_dir`` as a PEFT folder (default: OUTPUT_DIR/model)."""
        if self.summary is None:
            raise EssaError("nothing to save yet; call trainer.train() first")
        src = Path(self.summary["adapters"][which])
        out = Path(output_dir or Path(self.args.output_dir) / "model")
        if out.exists() and any(out.iterdir()) and not (out / "essa_genome.json").exists():
            raise EssaError(f"{out} is not empty and holds no adapter saved by essa (an SFT adapter or other files are "
                            f"never replaced); choose another output_dir (nothing was changed)")
        tmp = temp_dir_beside(out)
        try:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            install_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out
