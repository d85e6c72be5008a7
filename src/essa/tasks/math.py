"""GSM8K and MATH: loaders, answer extraction and rewards."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from functools import lru_cache

from essa.tasks.base import MATH_SYSTEM_PROMPT, Task, data_path, read_jsonl, seeded_split

#: Paper's split of GSM8K train (7473): 1495 for SFT, 5978 for RL.
GSM8K_SFT_SIZE, GSM8K_RL_SIZE = 1495, 5978
#: Same 20/80 proportion for MATH train (7500).
MATH_SFT_SIZE, MATH_RL_SIZE = 1500, 6000
SPLIT_SEED = 0


@dataclass(frozen=True)
class GSM8KExample:
    question: str
    solution: str   #: worked solution, calculator marks <<...>> removed, without the "#### answer" line
    answer: str     #: final answer, as after "####"

    def row(self) -> dict:
        return {"prompt": self.question, "answer": self.answer, "solution": self.solution}


@dataclass(frozen=True)
class MathExample:
    problem: str
    solution: str
    answer: str     #: MATH500's answer field, or the last \boxed{} of the solution (MATH train)
    subject: str
    level: str

    def row(self) -> dict:
        return {"prompt": self.problem, **{k: v for k, v in asdict(self).items() if k != "problem"}}


def gsm8k_example(rec: dict) -> GSM8KExample:
    body, _, final = rec["answer"].rpartition("####")
    body = re.sub(r"<<[^>]*>>", "", body).strip()
    return GSM8KExample(rec["question"], body, final.strip().replace(",", ""))


@lru_cache(maxsize=None)
def _gsm8k(split: str) -> tuple[GSM8KExample, ...]:
    return tuple(gsm8k_example(r) for r in read_jsonl(data_path("gsm8k", f"{split}.jsonl")))


def gsm8k_rows(split: str) -> list[dict]:
    """split: train (7473), test (1319), sft (1495) or rl (5978); sft/rl are a seeded split of train."""
    if split in ("train", "test"):
        return [e.row() for e in _gsm8k(split)]
    sft, rl = seeded_split(list(_gsm8k("train")), [GSM8K_SFT_SIZE, GSM8K_RL_SIZE], SPLIT_SEED)
    return [e.row() for e in (sft if split == "sft" else rl)]


def math_example(rec: dict) -> MathExample:
    """A MATH-style record: ``problem`` (or ``question``), ``answer`` (any scalar: AIME's integers too)
    and/or a ``solution`` whose last \\boxed{} is the answer. This is also the format of user benchmark
    files (AIME, AMC, Minerva, OlympiadBench as problem + answer jsonl): they are checked by math-verify."""
    solution = str(rec.get("solution") or "")
    answer = rec.get("answer")
    answer = str(answer) if answer is not None and str(answer) != "" else (last_boxed(solution) or "")
    problem = rec.get("problem") if rec.get("problem") is not None else rec.get("question", "")
    return MathExample(str(problem), solution, answer, rec.get("subject") or rec.get("type", ""),
                       str(rec.get("level", "")))


@lru_cache(maxsize=None)
def _math(split: str) -> tuple[MathExample, ...]:
    return tuple(math_example(r) for r in read_jsonl(data_path("math", f"{split}.jsonl")))


def math_rows(split: str) -> list[dict]:
    """split: train (7500), test = MATH500, sft (1500) or rl (6000); sft/rl are a seeded split of train."""
    if split in ("train", "test"):
        return [e.row() for e in _math(split)]
    sft, rl = seeded_split(list(_math("train")), [MATH_SFT_SIZE, MATH_RL_SIZE], SPLIT_SEED)
    return [e.row() for e in (sft if split == "sft" else rl)]


# ---------------------------------------------------------------- answer extraction

def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in text, braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
#: LaTeX text wrappers whose content is words, not the answer: \text{ per hour}, \mbox{...}, \mathrm{...}
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mbox|mathrm|textrm|operatorname)\s*\{[^{}]*\}")
_THOUSANDS = re.compile(r"(?<=\d)(?:\{,\}|,\\!|\\,|\\!|\\;|\\ |~|\u2009|\u202f)(?=\d{3}(?!\d))")


def normalize_numbers(text: str) -> str:
    """Plain numbers from LaTeX/typography: thousands separators written ``1{,}000``, ``1,\\!000``,
    ``1\\,000`` or with thin spaces become ``1,000``; Unicode minus signs become ``-``; ``\\$``, ``$``
    and ``%`` go; ``\\text{...}``-style words are removed (``18 \\text{ per 2 hours}`` → ``18``);
    ``\\frac{a}{b}`` stays (no single number)."""
    text = _TEXT_CMD.sub(" ", text)
    text = _THOUSANDS.sub(",", text)
    text = text.replace("\u2212", "-").replace("\u2013", "-").replace("\u2014", "-")
    text = text.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    text = re.sub(r"-\s+(?=\d)", "-", text)  # "- 5" after removing "\$" from "-\$5" is handled too
    return text


def extract_number(text: str) -> float | None:
    """GSM8K final answer of a completion: the \\boxed{} content, else what follows '####', else the
    last number in the text. Thousands separators (also LaTeX ones), $, % and \\text{} words are
    ignored; a Unicode minus is a minus (see ``normalize_numbers``)."""
    for candidate in (last_boxed(text), text.rpartition("####")[2] if "####" in text else None, text):
        if candidate is None:
            continue
        nums = _NUMBER.findall(normalize_numbers(candidate))
        if nums:
            try:
                return float(nums[-1].replace(",", ""))
            except ValueError:
                continue
    return None


def gsm8k_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 when the completion's final number equals the reference answer, else 0.0."""
    out = []
    for completion, ref in zip(completions, answer):
        got = extract_number(completion)
        want = float(str(ref).replace(",", ""))
        out.append(float(got is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))))
    return out


def math_reward(prompts, completions, answer, **_) -> list[float]:
    """1.0 when math-verify finds the completion's last \\boxed{} equivalent to the reference answer."""
    from math_verify import parse, verify

    out = []
    for completion, ref in zip(completions, answer):
        boxed = last_boxed(completion)
        if boxed is None:
            out.append(0.0)
            continue
        gold = parse(f"${ref}$")
        pred = parse(f"$\\boxed{{{boxed}}}$")
        out.append(float(bool(gold) and bool(pred) and verify(gold, pred)))
    return out


def check_gsm8k_row(row: dict):
    if "answer" not in row:
        raise KeyError("answer")
    try:
        float(str(row["answer"]).replace(",", ""))
    except ValueError:
        raise ValueError(f"answer {row['answer']!r} is not a number") from None


def check_math_row(row: dict):
    if not str(row.get("answer") or "").strip():
        raise ValueError("no answer (an 'answer' field, or a 'solution' ending in \\boxed{...})")


def accuracy_with(reward):
    def evaluate(rows: list[dict], completions: list[str]) -> dict:
        cols = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
        scores = reward([r["prompt"] for r in rows], completions, **cols)
        return {"accuracy": sum(scores) / max(1, len(scores)), "n": len(scores), "scores": scores}
    return evaluate


def gsm8k_target(row: dict) -> str:
    return f"{row['solution']}\nThe final answer is \\boxed{{{row['answer']}}}."


def math_target(row: dict) -> str:
    return row["solution"] if "\\boxed" in row["solution"] else f"{row['solution']}\n\\boxed{{{row['answer']}}}"


GSM8K = Task(
    name="gsm8k", splits={s: (lambda s=s: gsm8k_rows(s)) for s in ("train", "test", "sft", "rl")},
    reward=gsm8k_reward, system_prompt=MATH_SYSTEM_PROMPT, rl_split="rl", sft_split="sft", test_split="test",
    evaluate=accuracy_with(gsm8k_reward), sft_target=gsm8k_target, check_row=check_gsm8k_row,
    to_row=lambda r: gsm8k_example(r).row() if "question" in r else r)

MATH = Task(
    name="math", splits={s: (lambda s=s: math_rows(s)) for s in ("train", "test", "sft", "rl")},
    reward=math_reward, system_prompt=MATH_SYSTEM_PROMPT, rl_split="rl", sft_split="sft", test_split="test",
    evaluate=accuracy_with(math_reward), sft_target=math_target, check_row=check_math_row,
    to_row=lambda r: math_example(r).row() if ("problem" in r or "question" in r) else r)
