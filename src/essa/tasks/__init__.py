"""Tasks: datasets, prompts, rewards and evaluation metrics, one entry per benchmark (`TASKS`).

A task is plain data (`essa.tasks.base.Task`): where its splits come from, the system prompt, the reward
function (TRL signature ``f(prompts, completions, **columns) -> list[float | None]``) and the evaluation
summary. Rows are dicts with a ``prompt`` (the user message) plus the task's columns, which are passed
to the reward as keyword lists, exactly as TRL does.
"""

from __future__ import annotations

from essa import EssaError
from essa.tasks.base import (
    IFEVAL_SYSTEM_PROMPT,
    MATH_SYSTEM_PROMPT,
    PROMPTS,
    TASK_COLUMNS,
    Task,
    data_path,
    load_rows,
    read_jsonl,
    read_jsonl_records,
    seeded_split,
    split_rl_data,
)
from essa.tasks.ifeval import IFEVAL
from essa.tasks.math import GSM8K, MATH

#: every task by name (math500 = math: its test split is MATH500)
TASKS: dict[str, Task] = {"gsm8k": GSM8K, "math": MATH, "math500": MATH, "ifeval": IFEVAL, "prompts": PROMPTS}
TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> Task:
    """Look up a task by name (gsm8k, math, math500, ifeval, prompts)."""
    if name not in TASKS:
        raise EssaError(f"unknown task {name!r}; use one of: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["IFEVAL_SYSTEM_PROMPT", "MATH_SYSTEM_PROMPT", "TASKS", "TASK_COLUMNS", "TASK_NAMES", "Task", "data_path",
           "get_task", "load_rows", "read_jsonl", "read_jsonl_records", "seeded_split", "split_rl_data"]
