"""IFEval: instruction-following prompts, scored with Google's reference checkers.

The checkers are Google's ``instruction_following_eval`` code as maintained in EleutherAI's
lm-evaluation-harness (PyPI ``lm-eval``, module ``lm_eval/tasks/ifeval``: ``instructions.py``,
``instructions_registry.py``, ``instructions_util.py``). Only those three files are loaded, by path,
so none of lm-eval's own heavy dependencies are needed (it is installed with ``--no-deps``; the
checkers import only ``nltk``, ``langdetect``, ``immutabledict`` and ``packaging``).

Scoring follows the reference ``evaluation_lib.py``:

- strict: an instruction is followed when the response is non-blank and ``check_following`` is true;
- loose: the same, on any of eight variants of the response (as is, first line removed, last line
  removed, both removed, and each of those with every ``*`` deleted);
- prompt-level accuracy: all of a prompt's instructions followed; instruction-level accuracy: the
  fraction of all instructions followed.

Three deliberate, documented deviations; none changes a result that the reference computes
deterministically (checked against lm-eval's own ``utils.py`` on the 541 prompts):

- ``None`` values in kwargs are dropped before ``build_description`` (as lm-eval does; HF's copy of
  IFEval fills absent arguments with nulls). Only ``None`` is dropped, not other falsy values.
- ``build_description`` draws an unseeded random argument when one is missing or invalid (e.g. the
  letter-frequency checker when the letter is not a-z, prompts 1122 and 1129). Each instruction is
  built with Python's global ``random`` seeded to :data:`BUILD_SEED`, and the caller's random state
  is restored afterwards, so results do not change from run to run.
- langdetect is randomised; ``langdetect.DetectorFactory.seed`` is set to 0 for the same reason.

The NLTK ``punkt_tab`` sentence tokenizer data comes from the PyPI package ``llama-index-core``
(installed with ``--no-deps``; it ships ``llama_index/core/_static/nltk_cache``), which is put first
on ``nltk.data.path`` before the checkers load. Nothing is ever downloaded at run time.
"""

from __future__ import annotations

import json
from functools import lru_cache

from essa import EssaError
from essa.tasks.base import IFEVAL_SYSTEM_PROMPT, Task, data_path, read_jsonl
from essa.tasks.ifeval_checks import (
    build_instructions,
    check_ifeval_row,
    check_loose,
    check_row,
    check_strict,
    checkers,
    followed,
    instruction_ids,
    loose_variants,
    nltk_data_dir,
    text_of,
    use_bundled_nltk_data,
)

#: The paper's IFEval-like training data sizes (SFT by rejection sampling, RL prompts).
SFT_SIZE, RL_SIZE = 1700, 3414
#: Seed of the built-in generated splits.
DATA_SEED = 0


# ------------------------------------------------------------------ evaluation and reward

def ifeval_evaluate(rows: list[dict], completions: list[str]) -> dict:
    """The four IFEval metrics of ``completions`` (one per row, in order).

    Returns ``prompt_strict``, ``inst_strict``, ``prompt_loose``, ``inst_loose``, ``accuracy``
    (= ``prompt_strict``), ``n``, ``by_instruction`` ({id: {"strict", "loose", "n"}}) and ``results``:
    per prompt ``key``, ``strict_all``, ``strict_list``, ``loose_all``, ``loose_list``.
    """
    if len(rows) != len(completions):
        raise EssaError(f"{len(rows)} IFEval rows but {len(completions)} completions; pass one completion per row")
    results, per_id = [], {}
    for i, (row, completion) in enumerate(zip(rows, completions)):
        completion = text_of(completion)
        insts = build_instructions(row["instruction_id_list"], row.get("kwargs"), row.get("prompt", ""))
        strict, loose = check_strict(insts, completion), check_loose(insts, completion)
        results.append({"key": row.get("key", i), "strict_all": all(strict), "strict_list": strict,
                        "loose_all": all(loose), "loose_list": loose})
        ids = row["instruction_id_list"]
        for iid, s, lo in zip(json.loads(ids) if isinstance(ids, str) else ids, strict, loose):
            d = per_id.setdefault(iid, [0, 0, 0])
            d[0] += s
            d[1] += lo
            d[2] += 1
    n = len(results)
    n_inst = sum(len(r["strict_list"]) for r in results)

    def frac(num, den):
        return num / den if den else 0.0

    out = {
        "prompt_strict": frac(sum(r["strict_all"] for r in results), n),
        "inst_strict": frac(sum(sum(r["strict_list"]) for r in results), n_inst),
        "prompt_loose": frac(sum(r["loose_all"] for r in results), n),
        "inst_loose": frac(sum(sum(r["loose_list"]) for r in results), n_inst),
    }
    out["accuracy"] = out["prompt_strict"]
    out["n"] = n
    out["by_instruction"] = {k: {"strict": v[0] / v[2], "loose": v[1] / v[2], "n": v[2]}
                             for k, v in sorted(per_id.items())}
    out["results"] = results
    return out


def make_ifeval_reward(mode: str = "strict", all_or_nothing: bool = False):
    """An IFEval reward with the TRL signature.

    Per completion: the fraction of its row's instructions followed (``mode`` strict or loose), or,
    with ``all_or_nothing``, 1.0 only when all are followed. A row with no instruction scores 1.0.
    """
    if mode not in ("strict", "loose"):
        raise EssaError(f"unknown IFEval mode {mode!r}; use strict or loose")

    def ifeval_reward(prompts, completions, instruction_id_list, kwargs, **_) -> list[float]:
        cache: dict = {}
        out = []
        for prompt, completion, ids, kw in zip(prompts, completions, instruction_id_list, kwargs):
            prompt = text_of(prompt)
            key = (prompt, json.dumps(ids), json.dumps(kw, sort_keys=True, default=str))
            if key not in cache:
                cache[key] = build_instructions(ids, kw, prompt)
            ok = followed(cache[key], text_of(completion), mode)
            if not ok:
                out.append(1.0)
            elif all_or_nothing:
                out.append(float(all(ok)))
            else:
                out.append(sum(ok) / len(ok))
        return out

    ifeval_reward.__name__ = f"ifeval_reward_{mode}" + ("_all" if all_or_nothing else "")
    return ifeval_reward


#: The default IFEval reward: fraction of instructions followed, strict.
ifeval_reward = make_ifeval_reward("strict")
ifeval_reward.__name__ = "ifeval_reward"
#: Fraction of instructions followed, loose (IFEval's instruction-level loose metric, per completion):
#: ``reward: essa.tasks.ifeval:ifeval_reward_loose``.
ifeval_reward_loose = make_ifeval_reward("loose")


# ------------------------------------------------------------------ task

@lru_cache(maxsize=None)
def _test_rows() -> tuple:
    return tuple(json.dumps(r) for r in read_jsonl(data_path("ifeval", "input_data.jsonl")))


@lru_cache(maxsize=None)
def _generated(seed: int) -> tuple:
    from essa.tasks.ifeval_data import make_ifeval_like

    return tuple(json.dumps(r) for r in make_ifeval_like(SFT_SIZE + RL_SIZE, seed=seed))


def ifeval_rows(split: str) -> list[dict]:
    """test: the 541 IFEval prompts (evaluation only). train (5114), sft (1700), rl (3414): IFEval-like
    prompts generated in-process from :data:`DATA_SEED` (see essa.tasks.ifeval_data); sft is the first
    1700 generated rows, rl the rest. No generated prompt is an IFEval test prompt."""
    if split == "test":
        return [json.loads(r) for r in _test_rows()]
    rows = [json.loads(r) for r in _generated(DATA_SEED)]
    if split == "train":
        return rows
    if split == "sft":
        return rows[:SFT_SIZE]
    if split == "rl":
        return rows[SFT_SIZE:]
    raise EssaError(f"task 'ifeval' has no split {split!r}; use one of: train, test, sft, rl")


IFEVAL = Task(
    name="ifeval", splits={s: (lambda s=s: ifeval_rows(s)) for s in ("train", "test", "sft", "rl")},
    reward=ifeval_reward, system_prompt=IFEVAL_SYSTEM_PROMPT, rl_split="rl", sft_split="sft", test_split="test",
    evaluate=ifeval_evaluate, sft_target=None, check_row=check_ifeval_row)

__all__ = ["IFEVAL", "ifeval_evaluate", "ifeval_reward", "ifeval_reward_loose", "make_ifeval_reward", "check_row", "build_instructions",
           "checkers", "instruction_ids", "loose_variants", "nltk_data_dir", "use_bundled_nltk_data", "ifeval_rows"]

