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

import functools
import importlib.util
import json
import random
import sys
import types
from pathlib import Path

from essa import EssaError
from essa.tasks import IFEVAL_SYSTEM_PROMPT, Task, data_path, read_jsonl

#: Versions the Makefile installs (both with --no-deps).
LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"
NLTK_DATA_REQUIREMENT = "llama-index-core==0.14.25"
INSTALL_FIX = (f"run `pip install --no-deps {LM_EVAL_REQUIREMENT} {NLTK_DATA_REQUIREMENT}` "
               f"and `pip install nltk langdetect immutabledict`")
#: Seed of Python's ``random`` while an instruction is built (see module docstring).
BUILD_SEED = 0
#: The paper's IFEval-like training data sizes (SFT by rejection sampling, RL prompts).
SFT_SIZE, RL_SIZE = 1700, 3414
#: Seed of the built-in generated splits.
DATA_SEED = 0

_PKG = "lm_eval.tasks.ifeval"


# ------------------------------------------------------------------ loading the reference checkers

def nltk_data_dir() -> Path:
    """The ``nltk_cache`` folder shipped inside the installed ``llama-index-core`` package."""
    spec = importlib.util.find_spec("llama_index")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        d = Path(loc) / "core" / "_static" / "nltk_cache"
        if (d / "tokenizers" / "punkt_tab" / "english").is_dir():
            return d
    raise EssaError(f"IFEval needs NLTK's punkt_tab data from the PyPI package llama-index-core; {INSTALL_FIX}")


def use_bundled_nltk_data() -> Path:
    """Put the packaged NLTK data first on ``nltk.data.path`` (idempotent) and return its folder."""
    d = nltk_data_dir()
    try:
        import nltk
    except ImportError:
        raise EssaError(f"IFEval needs nltk; {INSTALL_FIX}") from None
    if str(d) not in nltk.data.path:
        nltk.data.path.insert(0, str(d))
    return d


class Checkers(types.SimpleNamespace):
    """The reference modules: ``instructions``, ``util``, ``registry``; plus ``INSTRUCTION_DICT`` and
    ``conflicts`` (the registry's conflict map made symmetric with its own ``conflict_make``)."""


@functools.lru_cache(maxsize=None)
def checkers() -> Checkers:
    """Load Google's instruction checkers from lm-eval (once per process)."""
    use_bundled_nltk_data()
    for dep in ("langdetect", "immutabledict", "packaging"):
        if importlib.util.find_spec(dep) is None:
            raise EssaError(f"IFEval needs the Python package {dep}; {INSTALL_FIX}")
    spec = importlib.util.find_spec("lm_eval")
    folder = Path(list(spec.submodule_search_locations)[0]) / "tasks" / "ifeval" if spec else None
    if folder is None or not (folder / "instructions_registry.py").exists():
        raise EssaError(f"IFEval needs Google's instruction checkers from the PyPI package lm-eval; {INSTALL_FIX}")
    mods = {}
    if f"{_PKG}.instructions_registry" in sys.modules:  # lm-eval already imported normally
        for name in ("instructions_util", "instructions", "instructions_registry"):
            mods[name] = sys.modules[f"{_PKG}.{name}"]
    else:
        # Load the three files by path under their real names, without running lm_eval/__init__.py
        # or lm_eval/tasks/__init__.py (which import lm-eval's whole framework). Each module is set
        # on the package before the next one runs, so their `from lm_eval.tasks.ifeval import x`
        # statements resolve without importing anything else.
        pkg = sys.modules.get(_PKG)
        if pkg is None:
            pkg = types.ModuleType(_PKG)
            pkg.__path__ = [str(folder)]
            pkg.__package__ = _PKG
            sys.modules[_PKG] = pkg
        for name in ("instructions_util", "instructions", "instructions_registry"):
            full = f"{_PKG}.{name}"
            mod = sys.modules.get(full)
            if mod is None:
                mspec = importlib.util.spec_from_file_location(full, folder / f"{name}.py")
                mod = importlib.util.module_from_spec(mspec)
                sys.modules[full] = mod
                try:
                    mspec.loader.exec_module(mod)
                except BaseException:
                    del sys.modules[full]
                    raise
            setattr(pkg, name, mod)
            mods[name] = mod
    import langdetect

    langdetect.DetectorFactory.seed = 0
    reg = mods["instructions_registry"]
    conflicts = reg.conflict_make({k: set(v) for k, v in reg.INSTRUCTION_CONFLICTS.items()})
    return Checkers(instructions=mods["instructions"], util=mods["instructions_util"], registry=reg,
                    INSTRUCTION_DICT=dict(reg.INSTRUCTION_DICT), conflicts=conflicts)


def instruction_ids() -> list[str]:
    """The 25 instruction ids of the reference registry."""
    return list(checkers().INSTRUCTION_DICT)


# ------------------------------------------------------------------ building and checking

def _kwargs_list(kwargs, n: int) -> list[dict]:
    if isinstance(kwargs, str):  # some exports store the kwargs column as a JSON string
        kwargs = json.loads(kwargs)
    if kwargs is None:
        kwargs = [{}] * n
    if len(kwargs) != n:
        raise EssaError(f"IFEval row has {n} instructions but {len(kwargs)} kwargs; make kwargs parallel "
                        f"to instruction_id_list")
    return [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs]


def build_instructions(instruction_id_list, kwargs, prompt: str = "") -> list:
    """Instantiate and build the checkers of one row, as the reference evaluation does.

    ``random`` is seeded with :data:`BUILD_SEED` around each ``build_description`` (and the caller's
    random state restored), so arguments the reference would draw at random are reproducible.
    """
    ck = checkers()
    if isinstance(instruction_id_list, str):
        instruction_id_list = json.loads(instruction_id_list)
    out = []
    for iid, kw in zip(instruction_id_list, _kwargs_list(kwargs, len(instruction_id_list))):
        cls = ck.INSTRUCTION_DICT.get(iid)
        if cls is None:
            raise EssaError(f"unknown IFEval instruction id {iid!r}; use one of the registry's ids "
                            f"(essa.tasks.ifeval.instruction_ids())")
        inst = cls(iid)
        state = random.getstate()
        random.seed(BUILD_SEED)
        try:
            inst.build_description(**kw)
            args = inst.get_instruction_args()
            if args and "prompt" in args:
                inst.build_description(prompt=prompt)
        except (TypeError, ValueError) as e:
            raise EssaError(f"bad kwargs {kw} for IFEval instruction {iid!r} ({e}); fix that row") from None
        finally:
            random.setstate(state)
        out.append(inst)
    return out


def loose_variants(response: str) -> list[str]:
    """The reference's eight loose variants of a response (in its order)."""
    r = response.split("\n")
    first = "\n".join(r[1:]).strip()
    last = "\n".join(r[:-1]).strip()
    both = "\n".join(r[1:-1]).strip()
    return [response, response.replace("*", ""), first, last, both,
            first.replace("*", ""), last.replace("*", ""), both.replace("*", "")]


def check_strict(instructions: list, response: str) -> list[bool]:
    return [bool(response.strip() and inst.check_following(response)) for inst in instructions]


def check_loose(instructions: list, response: str) -> list[bool]:
    variants = loose_variants(response)
    return [any(v.strip() and inst.check_following(v) for v in variants) for inst in instructions]


def _text(x) -> str:
    """A completion as text; a TRL conversational completion (list of messages) gives its last content."""
    if isinstance(x, list):
        return x[-1]["content"] if x else ""
    return x


def check_row(row: dict, response: str, mode: str = "strict") -> list[bool]:
    """Which of a row's instructions ``response`` follows (``mode``: strict or loose)."""
    insts = build_instructions(row["instruction_id_list"], row.get("kwargs"), row.get("prompt", ""))
    return _check(insts, _text(response), mode)


def check_ifeval_row(row: dict):
    """Raise naming what a user-supplied IFEval row lacks (instructions the registry can build)."""
    if "instruction_id_list" not in row:
        raise KeyError("instruction_id_list")
    ids = row["instruction_id_list"]
    if isinstance(ids, str):
        ids = json.loads(ids)
    if not isinstance(ids, list):
        raise TypeError(f"instruction_id_list must be a list of instruction ids, got {ids!r}")
    build_instructions(ids, row.get("kwargs"), row["prompt"])


def _check(insts, response, mode):
    if mode == "strict":
        return check_strict(insts, response)
    if mode == "loose":
        return check_loose(insts, response)
    raise EssaError(f"unknown IFEval mode {mode!r}; use strict or loose")


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
        completion = _text(completion)
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
            prompt = _text(prompt)
            key = (prompt, json.dumps(ids), json.dumps(kw, sort_keys=True, default=str))
            if key not in cache:
                cache[key] = build_instructions(ids, kw, prompt)
            followed = _check(cache[key], _text(completion), mode)
            if not followed:
                out.append(1.0)
            elif all_or_nothing:
                out.append(float(all(followed)))
            else:
                out.append(sum(followed) / len(followed))
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

@functools.lru_cache(maxsize=None)
def _test_rows() -> tuple:
    return tuple(json.dumps(r) for r in read_jsonl(data_path("ifeval", "input_data.jsonl")))


@functools.lru_cache(maxsize=None)
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

