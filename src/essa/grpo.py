"""`essa grpo`: the GRPO baseline, run through TRL's ``GRPOTrainer`` from the same SFT adapter as ESSA.

What is shared with `essa train`, so that the two are comparable:

- the base model (``essa.models.load_model``) and the SFT LoRA adapter as the starting point: it is
  loaded with ``PeftModel.from_pretrained(..., is_trainable=True)``, so GRPO continues training LoRA
  on the same modules with the same rank (all LoRA weights trainable, the base frozen);
- the prompts: the task's RL split minus the same seeded validation carve-out (:func:`essa.tasks.split_rl_data`),
  wrapped in the same chat messages (system prompt, then the user prompt);
- the reward: the same function (``resolve_reward``), called with the same arguments as ESSA's fitness
  (user prompt texts, completion texts, the rows' other columns), invalid values (None/NaN or a
  raising reward) scored as the worst valid reward of the batch, as ESSA does;
- validation and test: the *same evaluator*. The current LoRA weights are saved as a PEFT folder and
  installed, exactly like an ESSA candidate, into a ``PopulationEngine`` on a separate copy of the
  base model (loaded and quantized like ``essa.engines.build_engine``): the same prompt token ids
  (``chat_prompts``), greedy decoding, the same ``max_new_tokens``/stop strings, ``task.evaluate``.

Run directory (same layout as `essa train`): ``config.json``, ``metrics.jsonl`` (one line per
optimizer step: ``generation`` = step, ``reward_mean``, ``tokens``, ``wall_seconds`` ..., plus
``val_mean``/``best_val`` at validations), ``adapters/best`` (best by validation) and
``adapters/final`` (PEFT folders), ``test-{sft,best,final}.jsonl``, ``summary.json``; TRL's own
checkpoints (adapter + optimizer) go to ``checkpoints/``.

Batch sizes. The paper's GRPO baseline used lr 1e-5, a global (rollout) batch of 512 prompts and a
mini-batch of 64 prompts per update, i.e. 8 optimizer steps per rollout batch. The defaults here keep
lr and that 8:1 ratio, scaled to one GPU: an update sees ``per_device_batch × grad_accum`` = 64
completions = 8 prompts × ``num_generations`` 8, and a rollout batch is ``updates_per_rollout`` = 8
updates = 64 prompts (512 completions). ``max_steps`` counts optimizer steps.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from essa import EssaError
from essa.chat import chat_messages
from essa.config import help_field, to_dict
from essa.files import install_dir, temp_dir_beside
from essa.sampling import SamplingConfig
from essa.trainer import RunConfig

#: optimizer steps per rollout batch in the paper: global batch 512 / mini batch 64
PAPER_UPDATES_PER_ROLLOUT = 8


@dataclass
class GRPORunConfig(RunConfig):
    """`essa grpo`: GRPO (TRL GRPOTrainer) on the LoRA of an SFT adapter, validated like `essa train`."""

    # what to align: model, adapter, task, reward, system_prompt, train_data, val_size, test_limit (RunConfig)
    generation: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(max_new_tokens=256),
        metadata={"help": "max_new_tokens: rollout length (TRL max_completion_length) and validation/test length; "
                          "stop: stop strings of validation/test (TRL rollouts end at EOS or length only); "
                          "the other fields are not used (rollouts sample with `temperature`/`top_p`, "
                          "validation is greedy as in `essa train`)"})
    # -- GRPO (TRL GRPOConfig)
    lr: float = help_field(1e-5, "learning rate of the LoRA weights (paper: 1e-5)")
    lr_scheduler: str = help_field("constant", "transformers lr scheduler: constant | linear | cosine ... "
                                   "(constant: a time budget does not change the schedule)")
    num_generations: int = help_field(8, "completions sampled per prompt (the GRPO group size)")
    per_device_batch: int = help_field(16, "completions per forward/backward micro-batch (lower it if memory is short)")
    grad_accum: int = help_field(4, "micro-batches per optimizer step; per_device_batch*grad_accum completions per "
                                 "update must be a multiple of num_generations (default 64 = 8 prompts x 8)")
    updates_per_rollout: int = help_field(PAPER_UPDATES_PER_ROLLOUT, "optimizer steps per rollout (generation) batch; "
                                          "paper: global batch 512 / mini batch 64 = 8; 1 = fully on-policy")
    temperature: float = help_field(1.0, "rollout sampling temperature (TRL default 1.0; must be > 0: greedy "
                                     "rollouts give identical groups and no learning signal)")
    top_p: float = help_field(1.0, "rollout nucleus sampling")
    beta: float = help_field(0.0, "KL coefficient against the SFT adapter (TRL default 0.0 = no reference model; "
                             "DeepSeek-R1 used 0.001)")
    loss_type: str = help_field("dapo", "TRL loss aggregation: dapo (TRL default; token mean over the batch, as "
                                "verl's default) | grpo | dr_grpo | bnpo ...")
    max_steps: int = help_field(200, "optimizer steps (the time budget may stop earlier)")
    max_grad_norm: float = help_field(1.0, "gradient clipping")
    gradient_checkpointing: bool = help_field(True, "recompute activations in the backward pass (TRL default; saves memory)")
    trl_args: dict = help_field({}, "extra trl.GRPOConfig arguments, e.g. {use_vllm: true, scale_rewards: batch}")
    # -- validation, logging, budget
    eval_every_steps: int | None = help_field(10, "validate every N optimizer steps (and at start and end); null = only by time")
    eval_every_seconds: float | None = help_field(None, "also validate when this much wall-clock time passed since the last validation")
    max_minutes: float | None = help_field(None, "stop after this wall-clock budget (minutes), then validate and export")
    save_every_steps: int | None = help_field(50, "TRL checkpoint (adapter + optimizer) every N steps in checkpoints/; null = none")
    tensorboard: bool = help_field(False, "let TRL write TensorBoard logs to OUTPUT_DIR/checkpoints/runs")
    # -- run
    output_dir: str = help_field("runs/grpo", "run directory: metrics, checkpoints, adapters, summary")
    seed: int = help_field(0, "seed of the data order, the validation split and the sampling")

    def validate(self):
        if not self.adapter:
            raise EssaError("config needs `adapter`: the SFT LoRA adapter folder (run `essa sft` first)")
        self.validate_run()
        if self.engine == "vllm":
            raise EssaError("essa grpo generates its rollouts with TRL and validates with the native engine; "
                            "use engine native (or fast/hf) here, engine vllm is for essa train and essa eval")
        if self.num_generations < 2:
            raise EssaError(f"num_generations must be >= 2 (GRPO compares completions within a group), got {self.num_generations}")
        if self.per_device_batch < 1 or self.grad_accum < 1 or self.updates_per_rollout < 1 or self.max_steps < 1:
            raise EssaError("per_device_batch, grad_accum, updates_per_rollout and max_steps must be >= 1")
        if (self.per_device_batch * self.grad_accum) % self.num_generations:
            raise EssaError(f"per_device_batch*grad_accum = {self.per_device_batch * self.grad_accum} completions per "
                            f"update is not a multiple of num_generations {self.num_generations}; change one of them")
        if self.temperature <= 0:
            raise EssaError(f"temperature must be > 0 for GRPO rollouts (got {self.temperature}); use e.g. 1.0")
        if self.eval_every_steps is not None and self.eval_every_steps < 1:
            raise EssaError("eval_every_steps must be >= 1 or null")
        if self.device.startswith("cuda:") and self.device != "cuda:0":
            raise EssaError(f"device {self.device!r}: GRPO runs on the first visible GPU; "
                            f"select it with CUDA_VISIBLE_DEVICES and use device: cuda")


# ------------------------------------------------------------------------------ shared pieces

def _text(x) -> str:
    """A TRL conversational prompt/completion (list of messages) as the text of its last message."""
    if isinstance(x, list):
        return x[-1]["content"] if x else ""
    return x


class EssaReward:
    """The essa reward behind TRL's reward interface, called exactly as `essa train` calls it.

    TRL passes conversational prompts/completions and dataset columns; the wrapped reward gets the
    user prompt texts, the completion texts and the original rows' columns (looked up by the
    ``essa_row`` index, so nested columns are not altered by Arrow). Invalid values become the
    batch's worst valid reward. Also counts generated tokens and the batch reward mean for logging.
    """

    __name__ = "essa_reward"

    def __init__(self, reward_fn, rows: list[dict]):
        self.reward_fn, self.rows = reward_fn, rows
        self.tokens = 0
        self.invalid = 0
        self._pending: list[float] = []

    def __call__(self, prompts, completions, completion_ids=None, essa_row=None, **_):
        from essa.rewards import score_completions

        rows = [self.rows[int(i)] for i in essa_row]
        values, _, invalid = score_completions(self.reward_fn, rows, [_text(c) for c in completions])
        self.invalid += invalid
        self.tokens += sum(len(ids) for ids in (completion_ids or []))
        self._pending.extend(values)
        return values

    def take(self) -> dict:
        """Reward statistics of the rollouts scored since the last call."""
        vals, self._pending = self._pending, []
        if not vals:
            return {}
        mean = sum(vals) / len(vals)
        return {"reward_mean": mean, "reward_std": math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)),
                "reward_max": max(vals), "reward_min": min(vals)}


def save_adapter(peft_model, out_dir: Path, metadata: dict | None = None) -> Path:
    """The trained (default) LoRA adapter as a PEFT folder, written atomically."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out_dir)
    try:
        peft_model.save_pretrained(str(tmp), selected_adapters=["default"])
        if metadata:
            (tmp / "essa_grpo.json").write_text(json.dumps(metadata, indent=2))
        install_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


class Validator:
    """Greedy validation/test of PEFT adapter folders with essa's engine, as `essa train` does.

    Holds its own copy of the base model (loaded and quantized like ``build_engine``); each call
    installs the adapter's SVD genome at zero offset (= the adapter itself) and generates.
    """

    def __init__(self, cfg: GRPORunConfig, task, system_prompt):
        from essa.chat import chat_prompts
        from essa.models import load_model, quantize_model

        self.cfg, self.task, self.system_prompt = cfg, task, system_prompt
        self.model, self.tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
        quantize_model(self.model, cfg.quantization)
        self.model.requires_grad_(False)
        self.sampling = SamplingConfig(max_new_tokens=cfg.generation.max_new_tokens, stop=cfg.generation.stop)
        self._chat_prompts = chat_prompts
        self.tokens = 0

    def run(self, adapter_dir, rows: list[dict], prompt_ids=None) -> tuple[dict, list[str]]:
        import torch

        from essa.engine import NATIVE_KINDS, PopulationEngine
        from essa.genome import load_genome

        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()
        engine = PopulationEngine(self.model, self.tokenizer, load_genome(adapter_dir), clamp_min=None,
                                  memory_budget_gb=self.cfg.memory_budget_gb, max_batch_rows=self.cfg.max_batch_rows,
                                  fast=NATIVE_KINDS[self.cfg.engine])
        ids = prompt_ids if prompt_ids is not None else self.prompt_ids(rows)
        (per_prompt,) = engine.generate(ids, None, self.sampling)
        texts = [s[0].text for s in per_prompt]
        self.tokens += engine.stats.useful_tokens
        return self.task.evaluate(rows, texts), texts

    def prompt_ids(self, rows: list[dict]):
        return self._chat_prompts(self.tokenizer, [r["prompt"] for r in rows], self.system_prompt)


# ------------------------------------------------------------------------------ the run

def _grpo_args(cfg: GRPORunConfig, run_dir: Path, use_bf16: bool, on_cpu: bool):
    import dataclasses

    from trl import GRPOConfig

    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    bad = [k for k in cfg.trl_args if k not in names]
    if bad:
        raise EssaError(f"trl_args key {bad[0]!r} is not a trl.GRPOConfig argument; check its name in TRL's GRPOConfig docs")
    save = bool(cfg.save_every_steps)
    kwargs = dict(
        output_dir=str(run_dir / "checkpoints"), learning_rate=cfg.lr, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=0, weight_decay=0.0, max_grad_norm=cfg.max_grad_norm, max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_batch, gradient_accumulation_steps=cfg.grad_accum,
        steps_per_generation=cfg.grad_accum * cfg.updates_per_rollout, num_generations=cfg.num_generations,
        max_completion_length=cfg.generation.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        beta=cfg.beta, loss_type=cfg.loss_type, gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=1, save_strategy="steps" if save else "no", save_steps=cfg.save_every_steps or 500,
        save_total_limit=2 if save else None, report_to=["tensorboard"] if cfg.tensorboard else "none",
        seed=cfg.seed, data_seed=cfg.seed, bf16=use_bf16, fp16=False, use_cpu=on_cpu,
        remove_unused_columns=False, disable_tqdm=False, log_completions=False,
    )
    kwargs.update(cfg.trl_args)
    try:
        return GRPOConfig(**kwargs)
    except ValueError as e:
        raise EssaError(f"invalid GRPO settings: {str(e).splitlines()[0]}") from None


def import_trl():
    try:
        import trl  # noqa: F401
        from trl import GRPOTrainer
    except ImportError:
        raise EssaError("essa grpo needs TRL: run `pip install 'essa[grpo]'` (or `pip install trl datasets`)") from None
    return GRPOTrainer


def run_grpo(cfg: GRPORunConfig) -> dict:
    """Train with GRPO, validate like ESSA, export best/final adapters, test; returns the summary."""
    import torch
    from peft import PeftModel
    from transformers import TrainerCallback

    from essa.evaluate import Selection, paired_bootstrap, scored_rows, validation_score
    from essa.files import (
        abandon_run_dir,
        append_jsonl,
        check_new_run_dir,
        mark_run_dir,
        start_run_dir,
        write_json,
        write_jsonl_atomic,
    )
    from essa.genome import load_genome
    from essa.models import check_adapter_folder, load_model
    from essa.trainer import load_test_rows, resolve_val_metric, task_setup

    GRPOTrainer = import_trl()
    import trl
    from datasets import Dataset

    run_dir = Path(cfg.output_dir)
    check_new_run_dir(run_dir, "grpo", resumable=False)
    check_adapter_folder(cfg.adapter)
    created = not run_dir.exists()
    lock = start_run_dir(run_dir)
    try:  # a start that fails (data, model, reward, adapter) leaves the folder as it found it
        task, system_prompt, reward_fn, val_rows, train_rows = task_setup(cfg)
        val_metric = resolve_val_metric(cfg, task)
        test_rows = load_test_rows(cfg, task)
        load_genome(cfg.adapter)  # the validator installs the adapter as a genome: refuse what it cannot represent
        mark_run_dir(run_dir, "grpo", to_dict(cfg))
    except BaseException:
        abandon_run_dir(run_dir, created, lock)
        raise
    if cfg.generation.stop:
        print("essa grpo: generation.stop applies to validation/test only; TRL rollouts end at EOS or max_new_tokens")

    def messages(prompt: str) -> list[dict]:
        return chat_messages(prompt, system_prompt)

    dataset = Dataset.from_list([{"prompt": messages(r["prompt"]), "essa_row": i} for i, r in enumerate(train_rows)])
    reward = EssaReward(reward_fn, train_rows)

    model, tokenizer = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    model = PeftModel.from_pretrained(model, cfg.adapter, is_trainable=True)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    on_cpu = model.device.type == "cpu"
    use_bf16 = not on_cpu and next(model.base_model.parameters()).dtype == torch.bfloat16
    args = _grpo_args(cfg, run_dir, use_bf16, on_cpu)

    validator = Validator(cfg, task, system_prompt)
    val_ids = validator.prompt_ids(val_rows)
    adapters = run_dir / "adapters"
    selection = Selection()  # best by validation, as in `essa train`
    st = {"step": 0, "last_val_wall": 0.0, "wall": 0.0,
          "validations": 0, "stopped_by_budget": False}
    pending: dict = {}

    def validate(peft_model, step: int) -> float:
        adapters.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir_beside(adapters / "current")
        try:
            peft_model.save_pretrained(str(tmp), selected_adapters=["default"])
            acc = validation_score(task, val_metric, reward_fn, val_rows, validator.run(tmp, val_rows, val_ids)[1])
            st["validations"] += 1
            if selection.offer(acc, step):
                (tmp / "essa_grpo.json").write_text(json.dumps({
                    "selected_by": f"validation accuracy on {len(val_rows)} held-out train rows",
                    "generation": step, "val_accuracy": acc}, indent=2))
                install_dir(tmp, adapters / "best")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return acc

    def log(record: dict):
        append_jsonl(run_dir / "metrics.jsonl", [record])

    class EssaCallback(TrainerCallback):
        """Validation every eval_every_steps / eval_every_seconds, the time budget, metrics.jsonl."""

        def __init__(self):
            self.t0 = None
            self.trainer = None

        def _model(self):
            return self.trainer.accelerator.unwrap_model(self.trainer.model)

        def elapsed(self) -> float:
            return time.perf_counter() - self.t0

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()
            v = validate(self._model(), 0)
            st["last_val_wall"] = st["step_start"] = self.elapsed()
            log({"generation": 0, "val_mean": v, "best_val": selection.value, "tokens": 0,
                 "wall_seconds": round(st["last_val_wall"], 3)})

        def on_step_end(self, args, state, control, **kw):
            self.flush()
            step = state.global_step
            st["step"] = step
            wall = self.elapsed()
            step_seconds = wall - st.get("step_start", 0.0)
            rec = {"generation": step, **reward.take(), "tokens_generated": reward.tokens - st.get("tokens_logged", 0),
                   "tokens": reward.tokens, "invalid_rewards": reward.invalid}
            rec["tokens_per_second"] = round(rec["tokens_generated"] / max(step_seconds, 1e-9), 1)
            st["tokens_logged"] = reward.tokens
            due = control.should_training_stop or step >= state.max_steps or (
                cfg.eval_every_steps is not None and step % cfg.eval_every_steps == 0) or (
                cfg.eval_every_seconds is not None and wall - st["last_val_wall"] >= cfg.eval_every_seconds)
            # as in `essa train`: validate if due, then check the budget; a run stopped by the budget
            # is also validated at its last step
            for check_budget in (False, True):
                if check_budget and cfg.max_minutes is not None and self.elapsed() > 60 * cfg.max_minutes:
                    print(f"essa grpo: time budget of {cfg.max_minutes} min reached at step {step}")
                    control.should_training_stop = st["stopped_by_budget"] = True
                    due = "val_mean" not in rec
                if due and "val_mean" not in rec:
                    v = validate(self._model(), step)
                    st["last_val_wall"] = self.elapsed()
                    rec.update({"val_mean": v, "best_val": selection.value})
            st["wall"] = st["step_start"] = self.elapsed()
            rec["wall_seconds"] = round(st["wall"], 3)
            pending.clear()
            pending.update(rec)

        def on_log(self, args, state, control, logs=None, **kw):
            if not pending or not logs or "train_runtime" in logs:
                return
            for key, name in (("loss", "loss"), ("learning_rate", "lr"), ("grad_norm", "grad_norm"), ("kl", "kl"),
                              ("entropy", "entropy"), ("completions/mean_length", "completion_mean_length"),
                              ("completions/clipped_ratio", "clipped_ratio"), ("frac_reward_zero_std", "frac_reward_zero_std")):
                v = logs.get(key)
                if isinstance(v, (int, float)) and math.isfinite(v):
                    pending[name] = float(v)
            self.flush()

        def flush(self):
            if pending:
                log(dict(pending))
                pending.clear()

    callback = EssaCallback()
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[callback])
    callback.trainer = trainer
    print(f"essa grpo: TRL {trl.__version__}; group size {cfg.num_generations}, "
          f"{cfg.per_device_batch * cfg.grad_accum // cfg.num_generations} prompts per update, "
          f"{cfg.updates_per_rollout} updates per rollout batch, lr {cfg.lr}; validation = {len(val_rows)} held-out "
          f"rows of {task.name} train data (not test)")
    trainer.train()
    callback.flush()

    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    final_dir = save_adapter(peft_model, adapters / "final", {"generation": st["step"]})
    if not (adapters / "best").exists():  # cannot happen after a validation; kept for safety
        shutil.copytree(final_dir, adapters / "best")
    summary = {"run_dir": str(run_dir), "method": "grpo", "trl_version": trl.__version__,
               "generations": st["step"], "steps": st["step"], "best_val": selection.value,
               "best_val_generation": selection.generation,
               "selection_split": f"{len(val_rows)} rows held out from {task.name} RL/train data",
               "val_metric": val_metric, "system_prompt": system_prompt,
               "wall_seconds": round(st["wall"], 2), "tokens_generated": reward.tokens,
               "invalid_rewards": reward.invalid, "stopped_by_budget": st["stopped_by_budget"],
               "adapters": {"best": str(adapters / "best"), "final": str(final_dir)}}
    callback.trainer = None
    del trainer, model, peft_model
    if not on_cpu:
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    if test_rows is not None:
        test_ids = validator.prompt_ids(test_rows)
        summary["test_metric"] = val_metric
        per_row = {}
        for name, folder in (("sft", cfg.adapter), ("best", adapters / "best"), ("final", final_dir)):
            _, texts = validator.run(folder, test_rows, test_ids)
            summary[f"test_{name}"], per_row[name] = scored_rows(task, val_metric, reward_fn, test_rows, texts)
            write_jsonl_atomic(({"prompt": r["prompt"], "completion": t} for r, t in zip(test_rows, texts)),
                               run_dir / f"test-{name}.jsonl")
        if per_row["sft"] is not None:  # as essa train: paired intervals when the metric is a mean over rows
            for name in ("best", "final"):
                summary[f"test_{name}_minus_sft"] = paired_bootstrap(per_row["sft"], per_row[name], seed=cfg.seed)
        summary["test_n"] = len(test_rows)
    write_json(run_dir / "summary.json", summary)
    lock.close()
    return summary
