"""Supervised fine-tuning (SFT) warm start: train a fresh LoRA adapter on reference responses.

ESSA (arXiv 2507.04453) starts from an SFT LoRA adapter and then evolves its singular values. This
module produces that adapter with a plain PyTorch loop (AdamW, seeded shuffling, response-only loss):

* each row becomes a chat ``[system?, user = row["prompt"], assistant = response]`` rendered with the
  tokenizer's chat template, where the response is ``row["response"]`` if present, else the task's
  ``sft_target(row)`` (for GSM8K: the worked solution with the answer in ``\\boxed{}``);
* the loss is the token-mean cross-entropy over the assistant response only (prompt tokens and padding
  are labelled -100), up to and including the end-of-turn (eos) token;
* the output folder is a standard PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
  plus ``essa_sft_config.json`` (``{"config": <SFTConfig fields>, "rows": .., "final_loss": ..,
  "wall_time_s": .., ...}``), ``sft_log.jsonl`` (one JSON line per ``log_every`` steps: step, loss, lr,
  tokens, loss_tokens, epoch, elapsed) and TensorBoard scalars under ``tb/``. It is written atomically:
  training runs into a hidden temporary sibling folder that is renamed at the end.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from essa import EssaError, __version__
from essa.chat import chat_messages
from essa.config import help_field
from essa.files import install_dir, temp_dir_beside

IGNORE_INDEX = -100


@dataclass
class SFTConfig:
    """Settings of `essa sft` (every field is a CLI flag / YAML key of the same name)."""

    def validate(self):
        _validate_sft(self)

    model: str = help_field("smollm2-135m-instruct", "Base model: a built-in alias (smollm2-135m-instruct), a local HF model folder, or a hub id.")
    task: str = help_field("gsm8k", "Task whose system prompt and reference responses are used (gsm8k, math, ...).")
    data: str | None = help_field(None, "Training data: None = the task's SFT split; else a split name of the task, a local .jsonl "
                "of {prompt, response} pairs or of records in the task's own format, or an HF dataset id "
                "(id[:split]).")
    output_dir: str = help_field("runs/sft", "Folder for the PEFT adapter, essa_sft_config.json, sft_log.jsonl and tb/ (written atomically).")
    overwrite: bool = help_field(False, "Replace output_dir when it holds an earlier essa sft adapter (otherwise an existing adapter is an error; "
                "a folder holding anything else is never replaced).")
    target_modules: list[str] = help_field(["q_proj", "k_proj", "v_proj", "o_proj"], "Names of the linear layers that get a LoRA "
                                           "adapter (the attention projections, as in the paper).")
    rank: int = help_field(8, "LoRA rank r (paper: 8); the ESSA genome has layers x modules x 2 x floor(alpha*r) values.")
    lora_alpha: float = help_field(16, "LoRA scaling numerator: the update is (lora_alpha / rank) * B @ A (default 16 = 2 x rank).")
    lora_dropout: float = help_field(0.0, "Dropout on the LoRA input during SFT.")
    lr: float = help_field(1e-4, "Peak AdamW learning rate.")
    weight_decay: float = help_field(0.0, "AdamW weight decay.")
    scheduler: str = help_field("linear", "Learning-rate schedule after warmup: 'linear' (decay to 0 at the last step) or 'constant'.")
    warmup_ratio: float = help_field(0.03, "Fraction of the optimizer steps with a linear warmup from 0 to lr.")
    epochs: float = help_field(1, "Passes over the data (ignored when max_steps is set).")
    batch_size: int = help_field(4, "Examples per forward pass (micro-batch). Activation memory grows with it: about 13 GB at 16 "
                "x 512 tokens in fp32 for SmolLM2-135M, 4.5 GB at 4.")
    grad_accum: int = help_field(4, "Micro-batches per optimizer step; the effective batch is batch_size x grad_accum (default "
                "4 x 4 = 16). The loss is the token mean over the whole effective batch, so only memory and "
                "speed depend on the split.")
    max_length: int = help_field(512, "Maximum tokens per example (prompt + response); longer examples are truncated on the right.")
    max_steps: int | None = help_field(None, "Stop after this many optimizer steps (None: train for `epochs` full passes).")
    limit: int | None = help_field(None, "Use only the first N rows of the data (None: all rows).")
    max_grad_norm: float | None = help_field(1.0, "Clip the gradient norm to this value (None: no clipping).")
    gradient_checkpointing: bool = help_field(False, "Recompute activations in the backward pass: much less memory, one extra forward pass of time.")
    seed: int = help_field(0, "Seed for the LoRA initialisation and the shuffling of the data.")
    device: str = help_field("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:N.")
    dtype: str = help_field("auto", "Base model dtype: auto (fp32 on CPU, bf16 on CUDA), fp32, bf16, fp16. LoRA weights stay fp32.")
    log_every: int = help_field(1, "Write a line to sft_log.jsonl (and TensorBoard) every N optimizer steps.")
    tensorboard: bool = help_field(True, "Also write TensorBoard scalars to output_dir/tb.")
    progress: bool = help_field(True, "Show a tqdm progress bar.")


# ---------------------------------------------------------------------------- data

def response_of(row: dict, task) -> str:
    """The SFT target of a row: its "response" field, else the task's reference response."""
    if row.get("response") is not None:
        return str(row["response"])
    if task.sft_target is None:
        raise EssaError(f"rows have no 'response' field and task {task.name!r} has no reference responses; "
                        f"pass --data with a .jsonl of {{\"prompt\", \"response\"}} pairs")
    try:
        return task.sft_target(row)
    except KeyError as e:
        raise EssaError(f"row {sorted(row)} has no 'response' and lacks the {task.name} column {e}; "
                        f"add a 'response' field or use the task's own record format") from None


def _render(tok, messages: list[dict], **kw) -> str:
    try:
        return tok.apply_chat_template(messages, tokenize=False, **kw)
    except ValueError as e:  # no chat template
        raise EssaError(f"the tokenizer cannot render chats ({str(e).splitlines()[0]}); "
                        f"use an instruct model with a chat template") from None


def encode_example(tok, prompt: str, response: str, system_prompt: str | None, max_length: int) -> dict:
    """Token ids and labels of one chat example; labels are -100 except on the assistant response.

    The prompt part is the chat rendered without the assistant turn and with the generation prompt
    (exactly what the model sees at inference). Its tokens must be a prefix of the full chat's tokens;
    if the tokenizer merges across the boundary, the two parts are tokenized separately instead (which
    is again what inference produces). Everything after the last eos token of the completion (e.g. the
    template's trailing newline) is dropped, so the response ends with the end-of-turn token.
    """
    prompt_text = _render(tok, chat_messages(prompt, system_prompt), add_generation_prompt=True)
    full_text = _render(tok, chat_messages(prompt, system_prompt, response))
    if not full_text.startswith(prompt_text):
        raise EssaError("the chat template renders the prompt differently when an assistant turn follows; "
                        "use a model whose chat template appends the answer after the generation prompt")
    p_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    ids = tok(full_text, add_special_tokens=False)["input_ids"]
    if ids[:len(p_ids)] != p_ids:
        ids = p_ids + tok(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    completion = ids[len(p_ids):]
    eos = tok.eos_token_id
    if eos in completion:
        completion = completion[:len(completion) - completion[::-1].index(eos)]
    ids = (p_ids + completion)[:max_length]
    labels = ([IGNORE_INDEX] * len(p_ids) + completion)[:max_length]
    return {"input_ids": ids, "labels": labels}


def encode_rows(tok, rows: list[dict], task, max_length: int) -> tuple[list[dict], int]:
    """Encode rows; returns (examples, number dropped because the prompt alone fills max_length)."""
    examples, dropped = [], 0
    for row in rows:
        if "prompt" not in row:
            raise EssaError(f"row {sorted(row)} has no 'prompt' field; add one or use the task's own format")
        ex = encode_example(tok, str(row["prompt"]), response_of(row, task), task.system_prompt, max_length)
        if all(x == IGNORE_INDEX for x in ex["labels"]):
            dropped += 1
        else:
            examples.append(ex)
    return examples, dropped


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids (pad_id), attention_mask (0 on padding), labels (-100 on padding)."""
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------- model

def linear_layer_names(model) -> list[str]:
    """Distinct last name components of the model's linear layers (what target_modules matches)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


def attach_lora(model, cfg: SFTConfig):
    """Wrap the model with a fresh LoRA adapter (PEFT default init: A random, B zero)."""
    from peft import LoraConfig, get_peft_model

    targets = [cfg.target_modules] if isinstance(cfg.target_modules, str) else list(cfg.target_modules)
    if targets != ["all-linear"]:
        linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
        if missing:
            raise EssaError(f"target_modules {missing} match no linear layer of the model; its linear layers "
                            f"are: {', '.join(linear_layer_names(model))}")
    if cfg.rank < 1:
        raise EssaError(f"rank must be a positive integer, got {cfg.rank}")
    lcfg = LoraConfig(task_type="CAUSAL_LM", r=cfg.rank, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets)
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, lcfg)


def response_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed cross-entropy over the response tokens, number of response tokens).

    The LM head is applied only at the positions that predict a response token, which avoids the
    [batch, length, vocab] logits tensor (about 1.6 GB at batch 16 x 512 with a 49k vocabulary).
    """
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    n = int(keep.sum())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fast = hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings") and \
        getattr(base.config, "final_logit_softcapping", None) is None
    if fast:
        hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False).last_hidden_state
        logits = base.get_output_embeddings()(hidden[:, :-1][keep])
    else:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        logits = out.logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum"), n


def lr_at(step: int, total: int, cfg: SFTConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``."""
    warm = int(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / (warm + 1)
    if cfg.scheduler == "constant":
        return cfg.lr
    return cfg.lr * max(0.0, (total - step) / max(1, total - warm))


# ---------------------------------------------------------------------------- training

def _validate_sft(cfg: SFTConfig) -> None:
    if cfg.scheduler not in ("linear", "constant"):
        raise EssaError(f"unknown scheduler {cfg.scheduler!r}; use 'linear' or 'constant'")
    for name in ("batch_size", "grad_accum", "max_length", "log_every"):
        if int(getattr(cfg, name)) < 1:
            raise EssaError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise EssaError(f"max_steps must be >= 1 or None, got {cfg.max_steps}")
    if cfg.max_steps is None and not cfg.epochs > 0:
        raise EssaError(f"epochs must be > 0, got {cfg.epochs}; or set max_steps")
    from essa.models import check_device

    check_device(cfg.device)
    out = Path(cfg.output_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not (out / "essa_sft_config.json").is_file():
            raise EssaError(f"output_dir {out} exists, is not empty and holds no essa sft adapter; choose another folder "
                            f"(nothing in it was changed)")
        if not cfg.overwrite:
            raise EssaError(f"output_dir {out} already holds an essa sft adapter; choose another folder or pass "
                            f"--overwrite true to replace it")


def _batches(n: int, cfg: SFTConfig):
    """Endless stream of index lists: seeded shuffle per epoch, micro-batches of batch_size."""
    rng = random.Random(cfg.seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n, cfg.batch_size):
            yield order[i:i + cfg.batch_size]


def run_sft(cfg: SFTConfig) -> Path:
    """Train a LoRA adapter on the task's reference responses; returns the output folder."""
    from essa.models import load_model, resolve_model
    from essa.tasks import get_task, load_rows

    _validate_sft(cfg)
    t0 = time.time()
    task = get_task(cfg.task)
    # SFT reads the response (or the task's reference built from its columns: response_of checks those)
    rows = load_rows(task, cfg.data if cfg.data is not None else task.sft_split, limit=cfg.limit, task_columns=False)
    if not rows:
        raise EssaError(f"no training rows in {cfg.data or task.sft_split!r}; check --data and --limit")

    model, tok = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    tok.padding_side = "right"  # training pads on the right; load_tokenizer's left is for generation
    examples, dropped = encode_rows(tok, rows, task, cfg.max_length)
    if not examples:
        raise EssaError(f"every example's prompt is longer than max_length={cfg.max_length} tokens; "
                        f"raise --max-length")

    model = attach_lora(model, cfg)
    if cfg.gradient_checkpointing:
        base = model.get_base_model()  # transformers 5 renamed gradient_* to activation_checkpointing_*
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    micro_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * micro_per_epoch / cfg.grad_accum))

    out = Path(cfg.output_dir)
    tmp = temp_dir_beside(out)
    writer = None
    try:
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                writer = SummaryWriter(str(tmp / "tb"))
            except ImportError:
                writer = None
        log = open(tmp / "sft_log.jsonl", "w")
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="sft", disable=not cfg.progress, dynamic_ncols=True)
        stream = _batches(len(examples), cfg)
        tokens = loss_tokens = 0
        window: list[float] = []
        losses: list[float] = []
        for step in range(total):
            lr = lr_at(step, total, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            micro = [collate([examples[i] for i in next(stream)], tok.pad_token_id) for _ in range(cfg.grad_accum)]
            n_resp = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
            step_loss = 0.0
            for b in micro:  # token-mean over the whole accumulated batch
                b = {k: v.to(device) for k, v in b.items()}
                loss_sum, _ = response_loss(model, b)
                (loss_sum / n_resp).backward()
                step_loss += loss_sum.item() / n_resp
                tokens += int(b["attention_mask"].sum())
            loss_tokens += n_resp
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(step_loss)
            window.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if (step + 1) % cfg.log_every == 0 or step + 1 == total:
                rec = {"step": step + 1, "loss": sum(window) / len(window), "lr": lr, "tokens": tokens,
                       "loss_tokens": loss_tokens, "epoch": (step + 1) * cfg.grad_accum / micro_per_epoch,
                       "elapsed": round(time.time() - t0, 3)}
                window = []
                log.write(json.dumps(rec) + "\n")
                log.flush()
                if writer is not None:
                    for k in ("loss", "lr", "tokens", "epoch"):
                        writer.add_scalar(f"sft/{k}", rec[k], step + 1)
        bar.close()
        log.close()
        if writer is not None:
            writer.close()

        model.save_pretrained(str(tmp))
        tail = losses[-min(10, len(losses)):]
        meta = {
            "config": asdict(cfg),
            "essa_version": __version__,
            "model_path": resolve_model(cfg.model),
            "device": str(device),
            "dtype": str(next(model.get_base_model().parameters()).dtype).replace("torch.", ""),
            "rows": len(rows), "examples": len(examples), "dropped_prompt_too_long": dropped,
            "steps": total, "effective_batch_size": cfg.batch_size * cfg.grad_accum,
            "tokens": tokens, "loss_tokens": loss_tokens,
            "first_loss": losses[0], "final_loss": losses[-1], "final_loss_mean10": sum(tail) / len(tail),
            "wall_time_s": round(time.time() - t0, 3),
        }
        (tmp / "essa_sft_config.json").write_text(json.dumps(meta, indent=2))
        install_dir(tmp, out)  # atomic: the folder appears complete or not at all
    finally:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out
