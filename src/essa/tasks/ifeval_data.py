"""IFEval-like training data: generic requests plus verifiable constraints, and rejection sampling.

A row is ``{"key", "prompt", "instruction_id_list", "kwargs", "source"}``, the same shape as an IFEval
test row, so the same checkers score it (``essa.tasks.ifeval``).

- Base requests come from GSM8K train and MATH train questions (the vendored files, never their
  test sets) and from generic writing / yes-no tasks (:data:`WRITING_TASKS` x :data:`TOPICS`,
  :data:`YES_NO_TASKS` x :data:`TOPICS`). IFEval's test prompts are never used.
- Each request gets 1-3 constraints drawn from the reference registry's instruction ids. Their
  arguments are drawn by each checker's own ``build_description`` (Python's ``random`` seeded from
  the generator's RNG, the caller's state restored), which also renders the constraint text. Pairs
  in the registry's conflict map (made symmetric) are never combined, nor the few extra pairs in
  :data:`EXTRA_CONFLICTS` that the checkers make unsatisfiable together.
- ``detectable_format:constrained_response`` (answer "My answer is yes/no/maybe.") is only put on
  yes-no requests, alone, as the registry's conflict map requires.
- ``combination:repeat_prompt`` is built last, with the request text before it as the prompt to repeat.

Everything is deterministic for a given ``seed``.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable

from essa import EssaError

WRITING_TASKS = [
    "Write a short blog post about {topic}.",
    "Write a poem about {topic}.",
    "Write a short story that involves {topic}.",
    "Write an email to a friend about {topic}.",
    "Write a letter to a local newspaper editor about {topic}.",
    "Write a product description for a new gadget related to {topic}.",
    "Write a speech for a school assembly about {topic}.",
    "Write a limerick about {topic}.",
    "Write a haiku sequence about {topic}.",
    "Write a short essay on the history of {topic}.",
    "Explain {topic} to a ten-year-old.",
    "Summarize the main arguments for and against investing more in {topic}.",
    "Write a list of tips for beginners interested in {topic}.",
    "Write a persuasive paragraph convincing people to care about {topic}.",
    "Write a dialogue between two friends discussing {topic}.",
    "Write an advertisement for a workshop on {topic}.",
    "Write a job posting for a company that works on {topic}.",
    "Write a review of an imaginary book about {topic}.",
    "Write a motivational message for someone who is struggling with {topic}.",
    "Write a news report about a recent breakthrough in {topic}.",
    "Describe a typical day of a person whose job is about {topic}.",
    "Write a FAQ section for a website about {topic}.",
    "Write a short biography of a fictional expert in {topic}.",
    "Write a rap verse about {topic}.",
    "Write a social media post announcing an event about {topic}.",
    "Write an itinerary for a weekend trip themed around {topic}.",
    "Write a lesson plan outline for teaching {topic}.",
    "Write a riddle whose answer is related to {topic}.",
    "Write a complaint letter to a company about a problem with {topic}.",
    "Write a thank-you note to a mentor who taught you about {topic}.",
    "Write a pitch for a startup that focuses on {topic}.",
    "Compare two different approaches to {topic}.",
    "Write a diary entry about a day spent learning about {topic}.",
    "Write a set of instructions for getting started with {topic}.",
    "Write the opening paragraph of a novel set in a world shaped by {topic}.",
    "Write a song chorus about {topic}.",
    "Write a short debate opening statement on {topic}.",
    "Write a recommendation letter for a student who excels at {topic}.",
    "Describe the future of {topic} in twenty years.",
    "Write a funny anecdote about {topic}.",
]

YES_NO_TASKS = [
    "Is {topic} important for everyday life?",
    "Should schools teach more about {topic}?",
    "Is {topic} overrated?",
    "Would the world be better with more attention paid to {topic}?",
    "Can a beginner learn the basics of {topic} in a week?",
    "Is {topic} going to matter more in ten years than it does today?",
    "Should governments spend more money on {topic}?",
    "Is {topic} a good topic for a family dinner conversation?",
    "Is it expensive to get into {topic}?",
    "Do most people misunderstand {topic}?",
]

TOPICS = [
    "renewable energy", "urban gardening", "space exploration", "the history of jazz", "coffee",
    "remote work", "public libraries", "electric cars", "chess", "healthy sleep", "volcanoes",
    "the printing press", "honey bees", "marathon training", "recycling", "ancient Rome",
    "video game design", "learning a second language", "ocean conservation", "baking bread",
    "artificial intelligence", "bicycles", "photography", "the water cycle", "board games",
    "mountain hiking", "personal finance", "vaccines", "origami", "public transportation",
    "climate change", "dinosaurs", "classical music", "smartphones", "volunteering",
    "the Olympic games", "3D printing", "bird watching", "minimalism", "street food",
]

#: Pairs the reference conflict map allows but the checkers make unsatisfiable (or nearly) together.
EXTRA_CONFLICTS = [
    # a response wrapped in double quotes cannot end with the exact end phrase
    ("startend:quotation", "startend:end_checker"),
    # section markers are "Section"/"SECTION" (case-sensitive) vs an all-lowercase/all-caps response
    ("detectable_format:multiple_sections", "change_case:english_lowercase"),
    ("detectable_format:multiple_sections", "change_case:english_capital"),
    # a *highlighted* line starting with '*' counts as a bullet, breaking an exact bullet count
    ("detectable_format:number_highlighted_sections", "detectable_format:number_bullet_lists"),
    # English-specific checks in another language (non-Latin scripts have no a-z letters or CAPS words)
    ("language:response_language", "keywords:letter_frequency"),
    ("language:response_language", "change_case:capital_word_frequency"),
    ("language:response_language", "length_constraints:nth_paragraph_first_word"),
]

#: Weights of the base-request sources.
SOURCE_WEIGHTS = {"writing": 0.45, "gsm8k": 0.3, "math": 0.15, "yes_no": 0.1}
#: Probabilities of 1, 2 and 3 constraints.
NUM_CONSTRAINTS_WEIGHTS = (0.4, 0.35, 0.25)
#: Share of yes-no requests that get the constrained-response instruction (alone).
CONSTRAINED_RESPONSE_SHARE = 0.4
#: MATH problems longer than this many characters are not used as base requests.
MAX_MATH_CHARS = 600

_CONSTRAINED = "detectable_format:constrained_response"
_REPEAT = "combination:repeat_prompt"


def _bases(rng: random.Random) -> dict[str, list[str]]:
    from essa.tasks.math import gsm8k_rows, math_rows

    pools = {
        "writing": [t.format(topic=p) for t in WRITING_TASKS for p in TOPICS],
        "yes_no": [t.format(topic=p) for t in YES_NO_TASKS for p in TOPICS],
        "gsm8k": [r["prompt"].strip() for r in gsm8k_rows("train")],
        "math": [r["prompt"].strip() for r in math_rows("train") if len(r["prompt"]) <= MAX_MATH_CHARS],
    }
    for name in sorted(pools):
        rng.shuffle(pools[name])
    return pools


def conflicts() -> dict[str, set[str]]:
    from essa.tasks.ifeval_checks import checkers

    conf = {k: set(v) for k, v in checkers().conflicts.items()}
    for a, b in EXTRA_CONFLICTS:
        conf.setdefault(a, {a}).add(b)
        conf.setdefault(b, {b}).add(a)
    return conf


def _build(iid: str, rng: random.Random, **kwargs) -> tuple[str, dict]:
    """Build one checker with arguments drawn by its own build_description; returns (text, kwargs)."""
    from essa.tasks.ifeval_checks import checkers

    inst = checkers().INSTRUCTION_DICT[iid](iid)
    state = random.getstate()
    random.seed(rng.getrandbits(64))
    try:
        text = inst.build_description(**kwargs)
        args = inst.get_instruction_args() or {}
    finally:
        random.setstate(state)
    args = json.loads(json.dumps(args))  # tuples -> lists, as stored in JSONL
    return text.strip(), args


def _valid(iid: str, args: dict) -> bool:
    if iid == "length_constraints:nth_paragraph_first_word":
        # the reference draws nth in 1..num+1, and nth = num+1 can never be satisfied
        return 1 <= args["nth_paragraph"] <= args["num_paragraphs"]
    if iid == "length_constraints:number_sentences":
        return not (args["relation"] == "less than" and args["num_sentences"] <= 1)
    if iid == "length_constraints:number_words":
        return not (args["relation"] == "less than" and args["num_words"] <= 1)
    return True


def _compatible(built: list[tuple[str, dict]]) -> bool:
    """Keyword-level clashes: a required keyword that is also forbidden."""
    required, forbidden = set(), set()
    for iid, args in built:
        if iid == "keywords:existence":
            required |= {k.lower() for k in args["keywords"]}
        elif iid == "keywords:frequency" and args["relation"] == "at least":
            required.add(args["keyword"].lower())
        elif iid == "keywords:forbidden_words":
            forbidden |= {w.lower() for w in args["forbidden_words"]}
        elif iid == "length_constraints:nth_paragraph_first_word":
            required.add(args["first_word"].lower())
    return not (required & forbidden)


def _sentence(text: str) -> str:
    return text if text[-1:] in ".?!)" else text + "."


def make_ifeval_like(n: int, seed: int) -> list[dict]:
    """``n`` IFEval-like rows, deterministic for ``seed`` (see the module docstring)."""
    if n < 0:
        raise EssaError(f"cannot generate {n} rows; pass --n >= 0")
    from essa.tasks.ifeval_checks import checkers

    ids = sorted(checkers().INSTRUCTION_DICT)
    conflict_map = conflicts()
    rng = random.Random(seed)
    pools = _bases(rng)
    cursor = {k: 0 for k in pools}
    sources, weights = zip(*sorted(SOURCE_WEIGHTS.items()))
    rows = []
    for i in range(n):
        source = rng.choices(sources, weights)[0]
        pool = pools[source]
        base = pool[cursor[source] % len(pool)]
        cursor[source] += 1
        if source == "yes_no" and rng.random() < CONSTRAINED_RESPONSE_SHARE:
            chosen = [_CONSTRAINED]
        else:
            k = rng.choices((1, 2, 3), NUM_CONSTRAINTS_WEIGHTS)[0]
            chosen = []
            candidates = [x for x in ids if x != _CONSTRAINED]
            while len(chosen) < k:
                candidates = [x for x in candidates if not any(x in conflict_map[c] for c in chosen)]
                if not candidates:
                    break
                chosen.append(rng.choice(candidates))
        # the repeat-prompt instruction goes last: it repeats everything before it
        chosen.sort(key=lambda x: x == _REPEAT)
        for _attempt in range(100):
            built, texts = [], []
            for iid in chosen:
                if iid == _REPEAT:
                    continue
                for _ in range(100):
                    text, args = _build(iid, rng)
                    if _valid(iid, args):
                        break
                built.append((iid, args))
                texts.append(_sentence(text))
            if _compatible(built):
                break
        prompt = " ".join([base] + texts)
        if _REPEAT in chosen:
            text, args = _build(_REPEAT, rng, prompt_to_repeat=prompt)
            built.append((_REPEAT, args))
            prompt = f"{prompt}\n{text}"
        rows.append({"key": f"ifl-{seed}-{i}", "prompt": prompt,
                     "instruction_id_list": [iid for iid, _ in built],
                     "kwargs": [args for _, args in built], "source": source})
    return rows


def make_answer_format(heldout_topics: int = 10, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Yes-no questions with IFEval's constrained-response instruction ("Answer with one of the following
    options: My answer is yes. / no. / maybe."), split by topic: ``(train, heldout)``.

    Every :data:`YES_NO_TASKS` question about every :data:`TOPICS` topic (400 rows); the questions about
    ``heldout_topics`` topics (drawn with ``seed``) form the held-out rows, so no held-out question shares
    a topic with a training row. The rows have the IFEval row shape (one instruction each). `essa demo`
    trains on this task.
    """
    if not 1 <= heldout_topics < len(TOPICS):
        raise EssaError(f"heldout_topics must be in 1..{len(TOPICS) - 1}, got {heldout_topics}")
    rng = random.Random(seed)
    topics = sorted(TOPICS)
    rng.shuffle(topics)
    held = set(topics[:heldout_topics])
    train, heldout = [], []
    for t, topic in enumerate(sorted(TOPICS)):
        for q, question in enumerate(YES_NO_TASKS):
            text, args = _build(_CONSTRAINED, rng)
            row = {"key": f"yn-{t}-{q}", "prompt": f"{question.format(topic=topic)} {_sentence(text)}",
                   "instruction_id_list": [_CONSTRAINED], "kwargs": [args], "source": "yes_no"}
            (heldout if topic in held else train).append(row)
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, heldout


# ------------------------------------------------------------------ rejection sampling

def rejection_sample(rows: list[dict], generate: Callable[[list[str], int], list[list[str]]],
                     samples_per_prompt: int = 4, mode: str = "strict", max_per_prompt: int = 1,
                     batch_size: int | None = None) -> list[dict]:
    """SFT targets by rejection sampling: keep responses that follow all of a row's instructions.

    ``generate(prompts, n)`` returns ``n`` sampled responses per prompt (a list of lists, in order).
    Returns copies of the rows that got at least one passing response, each with a ``response``
    column; at most ``max_per_prompt`` distinct responses per row (one output row each), taken in
    the order generated. ``batch_size``: prompts per ``generate`` call (default: all at once).
    ``mode``: strict (default) or loose checking.
    """
    from essa.tasks.ifeval_checks import build_instructions, followed

    if samples_per_prompt < 1 or max_per_prompt < 1:
        raise EssaError("samples_per_prompt and max_per_prompt must be >= 1; pass positive values")
    if mode not in ("strict", "loose"):
        raise EssaError(f"unknown IFEval mode {mode!r}; use strict or loose")
    step = batch_size or max(1, len(rows))
    out = []
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        samples = generate([r["prompt"] for r in chunk], samples_per_prompt)
        if len(samples) != len(chunk):
            raise EssaError(f"generate returned {len(samples)} lists for {len(chunk)} prompts; "
                            f"return one list of responses per prompt")
        for row, candidates in zip(chunk, samples):
            insts = build_instructions(row["instruction_id_list"], row.get("kwargs"), row["prompt"])
            kept: list[str] = []
            for response in candidates:
                if response in kept:
                    continue
                if all(followed(insts, response, mode)):
                    kept.append(response)
                    out.append({**row, "response": response})
                    if len(kept) >= max_per_prompt:
                        break
    return out


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> Path:
    """Write rows as JSON Lines, atomically (essa.files.write_jsonl_atomic)."""
    from essa.files import write_jsonl_atomic

    return write_jsonl_atomic(rows, path)
