"""Reward (fitness) functions: reward models, user functions, weighted combinations.

Every reward has the TRL signature ``f(prompts, completions, **columns) -> list[float | None]``:
one value per completion, ``columns`` being the rows' other fields as lists. ``None`` (or NaN)
means "could not be scored"; the trainer counts those and gives them the worst score.

:func:`resolve_reward` turns a spec (config or CLI value) into such a function:

- a built-in task name: ``"gsm8k"``, ``"math"``, ``"ifeval"`` (that task's reward);
- ``"reward_model:<local folder or hub id>"``: :func:`reward_model_reward`;
- ``"module:function"`` (or ``"path/to/file.py:function"``): :func:`import_reward`;
- a list of ``{"reward": spec, "weight": w}`` (or ``(spec, w)`` pairs): :func:`combine_rewards`.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Callable, Iterable

from essa import EssaError

RewardFn = Callable[..., list]


# ------------------------------------------------------------------ reward models

def reward_model_reward(model: str, device: str = "auto", batch_size: int = 16, trust_remote_code: bool = False,
                        system_prompt: str | None = None, max_length: int | None = None,
                        dtype: str = "auto", score_head: str = "auto") -> RewardFn:
    """Score (prompt, completion) pairs with a sequence-classification reward model.

    ``model``: a local HF folder or a hub id of any ``AutoModelForSequenceClassification`` (hub ids
    need network access or a filled HF cache). The pair is formatted with the tokenizer's chat
    template when it has one (optional ``system_prompt``, then the user prompt and the assistant
    completion); otherwise the tokenizer encodes it as a text pair (prompt, completion), which is the
    plain concatenation with the tokenizer's own separator tokens, the usual input of cross-encoder
    reward models (e.g. OpenAssistant's DeBERTa RMs). Sequences are right-padded, truncated to
    ``max_length`` (default: the tokenizer's limit, at most 4096 tokens), and scored in batches of
    ``batch_size`` without gradients, on ``device`` (``auto``: CUDA if available, the policy's device).

    Score (``score_head``): ``auto`` = the model output's ``score`` field when it has one (custom heads
    such as ArmoRM's), else ``logits[:, 0]``; ``score`` = that field (an error if the output has none);
    ``logits:N`` = ``logits[:, N]`` (a one-label reward model's reward is ``logits:0``).
    A non-finite score is returned as ``None``.

    Examples::

        # Skywork / HelpSteer2-style single-head reward models (plain AutoModelForSequenceClassification)
        reward_model_reward("Skywork/Skywork-Reward-V2-Llama-3.1-8B")
        reward_model_reward("nvidia/Llama-3.1-Nemotron-70B-Reward-HF")   # any local HF-format copy works too
        # ArmoRM (multi-objective, HelpSteer2 among its objectives) ships custom code: its output has
        # `.score` (the gated preference score), which is used instead of logits[:, 0]
        reward_model_reward("RLHFlow/ArmoRM-Llama3-8B-v0.1", trust_remote_code=True)

    The returned function has ``model``, ``tokenizer`` and ``device`` attributes.
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from essa.chat import chat_messages
    from essa.models import pick_device, pick_dtype, resolve_model

    if batch_size < 1:
        raise EssaError(f"reward model batch_size must be >= 1 (got {batch_size}); pass a positive value")
    head = score_head
    if not (head in ("auto", "score") or (head.startswith("logits:") and head[7:].isdigit())):
        raise EssaError(f"reward model score_head must be auto, score or logits:N, got {score_head!r}")
    path = resolve_model(model)
    dev = pick_device(device)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        rm = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=pick_dtype(dtype, dev), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise EssaError(f"could not load reward model {model!r} ({str(e).splitlines()[0]}); pass a local folder "
                        f"or hub id of a sequence-classification model (add trust_remote_code for custom ones)"
                        ) from None
    rm.to(dev).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    if getattr(rm.config, "pad_token_id", None) is None:
        rm.config.pad_token_id = tok.pad_token_id
    limit = max_length or min(int(getattr(tok, "model_max_length", 4096) or 4096), 4096)
    use_template = bool(getattr(tok, "chat_template", None))

    def encode(prompts: list[str], completions: list[str]):
        if use_template:
            texts = []
            for p, c in zip(prompts, completions):
                texts.append(tok.apply_chat_template(chat_messages(p, system_prompt, c), tokenize=False))
            return tok(texts, add_special_tokens=False, padding=True, truncation=True, max_length=limit,
                       return_tensors="pt")
        first = [f"{system_prompt}\n\n{p}" if system_prompt else p for p in prompts]
        return tok(first, list(completions), padding=True, truncation=True, max_length=limit, return_tensors="pt")

    @torch.no_grad()
    def reward_model(prompts, completions, **_) -> list[float | None]:
        prompts = [_as_text(p) for p in prompts]
        completions = [_as_text(c) for c in completions]
        if len(prompts) != len(completions):
            raise EssaError(f"{len(prompts)} prompts but {len(completions)} completions; pass one prompt per completion")
        out: list[float | None] = []
        for i in range(0, len(completions), batch_size):
            batch = encode(prompts[i:i + batch_size], completions[i:i + batch_size]).to(dev)
            res = rm(**batch)
            score = getattr(res, "score", None) if head in ("auto", "score") else None
            if score is None and head == "score":
                raise EssaError(f"reward model {model!r} returns no .score; use score_head auto or logits:N")
            if score is None:
                score = res.logits[:, int(head[7:]) if head.startswith("logits:") else 0]
            score = score.float().reshape(len(batch["input_ids"]), -1)[:, 0]
            out.extend(v if math.isfinite(v) else None for v in score.cpu().tolist())
        return out

    reward_model.__name__ = f"reward_model[{model}]"
    reward_model.model, reward_model.tokenizer, reward_model.device = rm, tok, dev
    return reward_model


def _as_text(x) -> str:
    """A TRL conversational prompt/completion (list of messages) as the text of its last message."""
    if isinstance(x, list):
        return x[-1]["content"] if x else ""
    return x


# ------------------------------------------------------------------ custom rewards

def import_reward(spec: str) -> RewardFn:
    """Import a user reward ``"module:function"`` (or ``"path/to/file.py:function"``).

    The current working directory is importable (put first on ``sys.path`` if missing).
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise EssaError(f"reward {spec!r} is not of the form module:function; write e.g. my_rewards:length_reward")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.exists():
            raise EssaError(f"reward file {module_name!r} does not exist; pass an existing .py file or a module name")
        name = f"essa_user_reward_{file.stem}"
        mspec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(mspec)
        sys.modules[name] = module
        mspec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
                raise EssaError(f"cannot import reward module {module_name!r}; run from the folder that holds "
                                f"{module_name.split('.')[0]}.py or add it to PYTHONPATH") from None
            raise EssaError(f"reward module {module_name!r} failed to import: no module named {e.name!r}; "
                            f"install it") from None
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise EssaError(f"module {module_name!r} has no attribute {attr!r}; check the function name in {spec!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise EssaError(f"{spec!r} is a {type(fn).__name__}, not a function; point to a callable "
                        f"f(prompts, completions, **columns) -> list[float]")
    return fn


def _bad(v) -> bool:
    if v is None:
        return True
    try:
        return not math.isfinite(float(v))
    except (TypeError, ValueError):
        return True


def combine_rewards(parts: Iterable[tuple[RewardFn, float]]) -> RewardFn:
    """One reward: the weighted sum of ``parts`` ([(fn, weight), ...]).

    A completion that any part scores ``None``/NaN/inf (or a non-number) gets ``None``.
    """
    parts = list(parts)
    if not parts:
        raise EssaError("combine_rewards got no rewards; pass at least one (reward, weight) pair")
    for fn, w in parts:
        if not callable(fn):
            raise EssaError(f"combine_rewards got a non-callable reward {fn!r}; pass functions")
        if _bad(w) or isinstance(w, bool):
            raise EssaError(f"reward weight {w!r} is not a finite number; use e.g. 1.0")

    def combined(prompts, completions, **columns) -> list[float | None]:
        n = len(completions)
        total: list[float | None] = [0.0] * n
        for fn, w in parts:
            values = list(fn(prompts, completions, **columns))
            if len(values) != n:
                raise EssaError(f"reward {getattr(fn, '__name__', fn)!r} returned {len(values)} values for {n} "
                                f"completions; return one value per completion")
            for i, v in enumerate(values):
                if total[i] is None:
                    continue
                total[i] = None if _bad(v) else total[i] + float(w) * float(v)
        return total

    combined.__name__ = "combined[" + ", ".join(f"{float(w):g}*{getattr(fn, '__name__', 'reward')}"
                                                 for fn, w in parts) + "]"
    combined.parts = parts
    return combined


def resolve_reward(spec, device: str = "auto", batch_size: int = 16, trust_remote_code: bool = False,
                   system_prompt: str | None = None, max_length: int | None = None, score_head: str = "auto") -> RewardFn:
    """A reward function from a spec (see the module docstring); a callable is returned unchanged.

    ``device``, ``batch_size``, ``trust_remote_code`` and ``system_prompt`` are passed to reward models.
    """
    if callable(spec):
        return spec
    if isinstance(spec, (list, tuple)):
        parts = []
        for item in spec:
            if isinstance(item, dict):
                if "reward" not in item:
                    raise EssaError(f"reward entry {item!r} has no 'reward' key; write {{reward: SPEC, weight: W}}")
                sub, w = item["reward"], item.get("weight", 1.0)
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                sub, w = item
            else:
                raise EssaError(f"reward entry {item!r} is not {{reward: SPEC, weight: W}}; fix the rewards list")
            parts.append((resolve_reward(sub, device, batch_size, trust_remote_code, system_prompt, max_length, score_head), w))
        return combine_rewards(parts)
    if not isinstance(spec, str) or not spec.strip():
        raise EssaError(f"reward {spec!r} is not a reward spec; use a task name, reward_model:PATH or module:function")
    spec = spec.strip()
    from essa.tasks import TASK_NAMES, get_task

    if spec in TASK_NAMES:
        if get_task(spec).reward is None:
            raise EssaError(f"task {spec!r} has no reward of its own; use reward_model:PATH or module:function")
        return get_task(spec).reward
    if spec.startswith("reward_model:"):
        target = spec.partition(":")[2]
        if not target:
            raise EssaError("reward_model: needs a model; write reward_model:<local folder or hub id>")
        return reward_model_reward(target, device=device, batch_size=batch_size,
                                   trust_remote_code=trust_remote_code, system_prompt=system_prompt,
                                   max_length=max_length, score_head=score_head)
    if ":" in spec:
        return import_reward(spec)
    raise EssaError(f"unknown reward {spec!r}; use a task name ({', '.join(TASK_NAMES)}), "
                    f"reward_model:<folder or hub id>, or module:function")


class RewardTimeout(EssaError):
    """A reward call ran past its time limit (`reward_timeout`): the run stops instead of hanging."""


def with_timeout(reward_fn: RewardFn, seconds: float | None) -> RewardFn:
    """``reward_fn`` limited to ``seconds`` per call: past it, :class:`RewardTimeout` (one line, exit 2).

    The call runs in a daemon thread; a reward that hangs forever is abandoned there (Python cannot kill a
    thread) and the process ends with the error, its last checkpoint intact for ``--resume``."""
    if seconds is None:
        return reward_fn
    import threading

    def limited(prompts, completions, **columns):
        box: dict = {}

        def call():
            try:
                box["value"] = reward_fn(prompts, completions, **columns)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
                box["error"] = e

        worker = threading.Thread(target=call, name="essa-reward", daemon=True)
        worker.start()
        worker.join(seconds)
        if worker.is_alive():
            name = getattr(reward_fn, "__name__", "the reward")
            raise RewardTimeout(f"reward {name} did not return within reward_timeout={seconds:g} s for {len(completions)} "
                                f"completions; fix the reward or raise reward_timeout (runs continue from their last "
                                f"checkpoint with --resume)")
        if "error" in box:
            raise box["error"]
        return box["value"]

    limited.__name__ = getattr(reward_fn, "__name__", "reward")
    limited.__wrapped__ = reward_fn
    return limited


def reward_columns(rows: list[dict]) -> dict[str, list]:
    """The rows' fields other than ``prompt``, as keyword lists for a TRL-signature reward."""
    return {key: [r.get(key) for r in rows] for key in rows[0] if key != "prompt"} if rows else {}


def score_completions(reward_fn, rows: list[dict], texts: list[str]) -> tuple[list[float], list[float], int]:
    """(scores, raw, invalid) of completions ``texts`` (``rows[i]`` is the row of ``texts[i]``), as `essa train`
    and `essa grpo` both score them: ``raw`` has NaN where the reward gave None/NaN or raised; ``scores``
    replaces those by the worst valid score of the call (0.0 when none is valid); ``invalid`` counts them."""
    raw, invalid = safe_rewards(reward_fn, [r["prompt"] for r in rows], texts, reward_columns(rows))
    valid = [v for v in raw if math.isfinite(v)]
    worst = min(valid) if valid else 0.0
    return [v if math.isfinite(v) else worst for v in raw], raw, invalid


def safe_rewards(reward_fn, prompts, completions, columns) -> tuple[list[float], int]:
    """Call a reward; None/NaN entries or an exception become NaN, counted as invalid. A
    :class:`RewardTimeout` is not absorbed: it stops the run."""
    try:
        values = reward_fn(prompts, completions, **columns)
        values = [float("nan") if v is None else float(v) for v in values]
        if len(values) != len(completions):
            raise ValueError(f"reward returned {len(values)} values for {len(completions)} completions")
    except RewardTimeout:
        raise
    except Exception as e:  # noqa: BLE001 - a user reward must not kill a long run
        print(f"essa: reward raised {type(e).__name__}: {e}; scoring these completions as worst")
        values = [float("nan")] * len(completions)
    invalid = sum(1 for v in values if not math.isfinite(v))
    return values, invalid
