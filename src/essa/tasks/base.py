"""What a task is (`Task`) and how its rows load: files, HF datasets, seeded splits, row checks.

A task is plain data (`Task`): where its splits come from, the system prompt, the reward function
(TRL signature ``f(prompts, completions, **columns) -> list[float | None]``) and the evaluation
summary. Rows are dicts with a ``prompt`` (the user message) plus the task's columns, which are
passed to the reward as keyword lists, exactly as TRL does.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from essa import EssaError

#: The ESSA paper's system prompts (arXiv 2507.04453): math tasks and instruction following.
MATH_SYSTEM_PROMPT = "Please reason step by step and place your final answer in \\boxed{}."
IFEVAL_SYSTEM_PROMPT = "You are a helpful, honest, and concise assistant."


@dataclass(frozen=True)
class Task:
    name: str
    #: split name -> function returning rows (dicts with "prompt" and the task's columns)
    splits: dict[str, Callable[[], list[dict]]]
    #: reward function with the TRL signature
    reward: Callable[..., list] | None
    #: system prompt put before every user prompt (None: the chat template's default)
    system_prompt: str | None
    #: split used for ESSA/GRPO training, for SFT, and for the test report
    rl_split: str | None
    sft_split: str | None
    test_split: str | None
    #: (rows, completions) -> dict of metrics, with at least "accuracy" and "n"
    evaluate: Callable[[list[dict], list[str]], dict]
    #: row -> SFT target response (None: the task has no reference responses)
    sft_target: Callable[[dict], str] | None = None
    #: maps a local/HF record to a row; used for user-supplied data
    to_row: Callable[[dict], dict] | None = None
    #: raises ValueError/KeyError/TypeError naming what a user-supplied row lacks (checked on load)
    check_row: Callable[[dict], None] | None = None


def data_path(*parts: str) -> Path:
    """Path of a vendored data file (see essa/data/PROVENANCE.md)."""
    return Path(str(resources.files("essa").joinpath("data", *parts)))


def read_jsonl_records(path: str | Path):
    """(line number, record) of every non-blank line; one-line errors for a missing file, bytes that are
    not UTF-8, and lines that are not JSON objects."""
    path = Path(path)
    if not path.is_file():
        raise EssaError(f"data file {path} does not exist; pass an existing .jsonl file or an HF dataset id")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise EssaError(f"{path}:{line} is not UTF-8 text (byte {e.object[e.start]:#x}); save the file as UTF-8") from None
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EssaError(f"{path}:{i} is not valid JSON ({e.msg}); fix or remove that line") from None
        if not isinstance(rec, dict):
            raise EssaError(f"{path}:{i} is a JSON {type(rec).__name__}, not an object; each line must be one "
                            f"{{\"prompt\": ...}} object")
        yield i, rec


def read_jsonl(path: str | Path) -> list[dict]:
    return [rec for _, rec in read_jsonl_records(path)]


def seeded_split(rows: list, sizes: list[int], seed: int) -> list[list]:
    """Deterministically shuffle ``rows`` with ``seed`` and cut consecutive parts of the given sizes."""
    if sum(sizes) > len(rows):
        raise EssaError(f"cannot split {len(rows)} rows into parts of {sizes}; use smaller parts")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    out, start = [], 0
    for n in sizes:
        out.append([rows[i] for i in order[start:start + n]])
        start += n
    return out


def load_rows(task: Task, source: str | None = None, split: str | None = None, limit: int | None = None,
              task_columns: bool = True) -> list[dict]:
    """Rows of a task: a built-in split name, a local .jsonl file, or an HF dataset id (``id[:split]``).

    User-supplied rows are checked as they load (a non-empty ``prompt``; with ``task_columns`` also the
    columns the task's reward and evaluation read): the first bad row is one line naming it."""
    if source is None or source in task.splits:
        name = source or split or task.test_split
        if name not in task.splits:
            raise EssaError(f"task {task.name!r} has no split {name!r}; use one of: {', '.join(task.splits)}")
        rows = task.splits[name]()
    elif source.endswith(".jsonl") or Path(source).exists():
        rows = [_row(task, r, f"{source}:{i}", task_columns) for i, r in read_jsonl_records(source)]
        if not rows:
            raise EssaError(f"data file {source} holds no rows; add one JSON object per line")
    else:
        rows = [_row(task, r, f"{source} row {i}", task_columns) for i, r in enumerate(_load_hf(source, split), 1)]
        if not rows:
            raise EssaError(f"dataset {source} holds no rows; pass a dataset (or split) with rows")
    return rows[:limit] if limit else rows


def split_rl_data(task: Task, train_data: str | None, val_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(validation rows, training rows): the task's RL data minus a seeded validation carve-out.

    ESSA (`essa train`) and GRPO (`essa grpo`) both call this, so with the same settings they
    validate on the same rows and train on the same rest. Selection never touches the test split.
    """
    if not (train_data or task.rl_split):
        raise EssaError(f"task {task.name!r} has no built-in training prompts; set train_data to a .jsonl file with a "
                        f"'prompt' field per row (or an HF dataset id)")
    pool = load_rows(task, train_data or task.rl_split)
    if val_size >= len(pool):
        raise EssaError(f"val_size {val_size} leaves no training data out of {len(pool)} rows; lower it")
    val_rows, train_rows = seeded_split(pool, [val_size, len(pool) - val_size], seed + 12345)
    return val_rows, train_rows


def _row(task: Task, record: dict, where: str, task_columns: bool = True) -> dict:
    """A user-supplied record as a row of the task, checked: one line naming the row and what it lacks."""
    try:
        row = task.to_row(record) if task.to_row is not None and "prompt" not in record else record
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError("no 'prompt' (a non-empty string)" + ("" if "prompt" in record else
                             f"; its fields are {sorted(record)}"))
        if task_columns and task.check_row is not None:
            task.check_row(row)
    except EssaError as e:
        raise EssaError(f"{where}: {e}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        what = f"no {e.args[0]!r} field" if isinstance(e, KeyError) else str(e)
        raise EssaError(f"{where}: {what} (a {task.name} row needs {TASK_COLUMNS.get(task.name, 'prompt')}); fix or "
                        f"remove that row") from None
    return row


#: the columns a user-supplied row of each task needs (for error messages)
TASK_COLUMNS = {"gsm8k": "prompt (or question) and a numeric answer",
                "math": "prompt (or problem) and an answer (or a solution with \\boxed{})",
                "ifeval": "prompt, instruction_id_list and kwargs", "prompts": "prompt"}


def _load_hf(dataset_id: str, split: str | None):
    name, _, sub = dataset_id.partition(":")
    try:
        import datasets
    except ImportError:
        raise EssaError(f"{dataset_id!r} is neither a split name nor a local file; to load an HF dataset, "
                        f"`pip install datasets`") from None
    try:
        return list(datasets.load_dataset(name, split=sub or split or "train"))
    except Exception as e:  # network, missing dataset, bad split
        raise EssaError(f"could not load HF dataset {dataset_id!r}: {str(e).splitlines()[0]}") from None


def _prompts_evaluate(rows: list[dict], completions: list[str]) -> dict:
    """The prompts task has no answers: its metric is the mean reward (val_metric 'reward')."""
    return {"n": len(rows)}


#: Prompt-only data aligned to a reward (e.g. HelpSteer2 prompts + ArmoRM, the paper's setting): rows
#: need only ``prompt``; ``train_data`` (and ``test_data`` for a test score) and ``reward`` are required;
#: validation and test report the mean of the reward being optimised.
PROMPTS = Task(name="prompts", splits={}, reward=None, system_prompt=IFEVAL_SYSTEM_PROMPT, rl_split=None,
               sft_split=None, test_split=None, evaluate=_prompts_evaluate, sft_target=None)
