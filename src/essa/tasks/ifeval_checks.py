"""IFEval's instruction checkers: Google's reference code, loaded from lm-eval's files, and how a
response is checked against a row's instructions (strict and loose). Both IFEval modules
(``essa.tasks.ifeval``: the task; ``essa.tasks.ifeval_data``: IFEval-like training data) use them.

The checkers are Google's ``instruction_following_eval`` code as maintained in EleutherAI's
lm-evaluation-harness (PyPI ``lm-eval``, module ``lm_eval/tasks/ifeval``: ``instructions.py``,
``instructions_registry.py``, ``instructions_util.py``). Only those three files are loaded, by path,
so none of lm-eval's own heavy dependencies are needed (it is installed with ``--no-deps``; the
checkers import only ``nltk``, ``langdetect``, ``immutabledict`` and ``packaging``). See
``essa.tasks.ifeval`` for the scoring rules and the deliberate deviations (seeded builds, langdetect seed).

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

#: Versions the Makefile installs (both with --no-deps).
LM_EVAL_REQUIREMENT = "lm-eval==0.4.13"
NLTK_DATA_REQUIREMENT = "llama-index-core==0.14.25"
INSTALL_FIX = (f"run `pip install --no-deps {LM_EVAL_REQUIREMENT} {NLTK_DATA_REQUIREMENT}` "
               f"and `pip install nltk langdetect immutabledict`")
#: Seed of Python's ``random`` while an instruction is built (see module docstring).
BUILD_SEED = 0

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


def text_of(x) -> str:
    """A completion as text; a TRL conversational completion (list of messages) gives its last content."""
    if isinstance(x, list):
        return x[-1]["content"] if x else ""
    return x


def check_row(row: dict, response: str, mode: str = "strict") -> list[bool]:
    """Which of a row's instructions ``response`` follows (``mode``: strict or loose)."""
    insts = build_instructions(row["instruction_id_list"], row.get("kwargs"), row.get("prompt", ""))
    return followed(insts, text_of(response), mode)


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


def followed(insts, response: str, mode: str) -> list[bool]:
    """Which of the built instructions ``response`` follows (``mode``: strict or loose)."""
    if mode == "strict":
        return check_strict(insts, response)
    if mode == "loose":
        return check_loose(insts, response)
    raise EssaError(f"unknown IFEval mode {mode!r}; use strict or loose")
