"""IFEval scoring (Google's reference checkers via lm-eval), the reward, and the IFEval-like data generator."""

import json
import os
import random
import subprocess
import sys
import textwrap

import pytest

from essa import EssaError
from essa.tasks import get_task
from essa.tasks.ifeval import (
    IFEVAL,
    build_instructions,
    check_row,
    ifeval_evaluate,
    ifeval_reward,
    ifeval_rows,
    instruction_ids,
    loose_variants,
    make_ifeval_reward,
    nltk_data_dir,
)
from essa.tasks.ifeval_data import make_answer_format, make_ifeval_like, rejection_sample, write_jsonl


def row(ids, kwargs=None, prompt="Write something.", key=0):
    return {"key": key, "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs or [{} for _ in ids]}


# (instruction id, kwargs, good response, bad response)
CASES = [
    ("punctuation:no_comma", {}, "Hello world. No pauses here.", "Hello, world."),
    ("change_case:english_lowercase", {}, "this is all lowercase english text.", "This Is Not lowercase."),
    ("change_case:english_capital", {}, "THIS IS ALL CAPITAL ENGLISH TEXT.", "THIS is not."),
    ("detectable_format:title", {}, "<<A Title>>\nSome body text.", "No title here."),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 5},
     "one two three four five six", "one two"),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 5}, "one two", "one two three four five"),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Body text.\nP.S. see you soon", "Body only."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "Here you go. Any other questions?",
     "Any other questions? Here you go."),
    ("detectable_format:json_format", {}, '```json\n{"a": 1}\n```', "a: 1"),
    ("keywords:existence", {"keywords": ["banana", "kiwi"]}, "I like banana and kiwi.", "I like banana."),
    ("keywords:forbidden_words", {"forbidden_words": ["banana"]}, "I like apples.", "I like Banana."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", "* one\n* two\n* three"),
    ("startend:quotation", {}, '"wrapped in quotes"', "not wrapped"),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", "Dear [name]."),
    ("combination:two_responses", {}, "First answer.\n******\nSecond answer.", "Only one answer."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "Para one.\n***\nPara two.", "Just one."),
]


@pytest.mark.parametrize("iid,kwargs,good,bad", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_known_good_and_bad(iid, kwargs, good, bad):
    r = row([iid], [kwargs])
    assert check_row(r, good) == [True]
    assert check_row(r, bad) == [False]
    assert check_row(r, good, mode="loose") == [True]


def test_loose_passes_where_strict_fails():
    # a chatty first line breaks "all lowercase"; loose drops the first line
    r = row(["change_case:english_lowercase"])
    response = "Sure! Here it is:\nall lowercase from here on."
    assert check_row(r, response, "strict") == [False]
    assert check_row(r, response, "loose") == [True]
    # markdown bold around the end phrase: loose deletes the '*'
    r = row(["startend:end_checker"], [{"end_phrase": "Any other questions?"}])
    assert check_row(r, "Done. **Any other questions?**", "strict") == [False]
    assert check_row(r, "Done. **Any other questions?**", "loose") == [True]
    assert len(loose_variants("a\nb\nc")) == 8


def test_blank_response_never_follows():
    r = row(["punctuation:no_comma"])
    assert check_row(r, "   ", "strict") == [False]
    assert check_row(r, "   ", "loose") == [False]


def test_four_metrics_on_a_handcrafted_set():
    rows = [
        row(["punctuation:no_comma", "change_case:english_lowercase"], key=1),
        row(["punctuation:no_comma"], key=2),
        row(["change_case:english_lowercase", "startend:end_checker"], [{}, {"end_phrase": "Bye."}], key=3),
    ]
    completions = [
        "the weather is lovely today and we are going for a walk",  # strict 2/2
        "oops, a comma",                     # strict 0/1, loose 0/1
        "Intro Line\nlowercase text. **bye.**",  # strict 0/2, loose 2/2
    ]
    m = ifeval_evaluate(rows, completions)
    assert m["n"] == 3
    assert m["prompt_strict"] == pytest.approx(1 / 3)
    assert m["inst_strict"] == pytest.approx(2 / 5)
    assert m["prompt_loose"] == pytest.approx(2 / 3)
    assert m["inst_loose"] == pytest.approx(4 / 5)
    assert m["accuracy"] == m["prompt_strict"]
    assert [r["key"] for r in m["results"]] == [1, 2, 3]
    assert m["results"][2] == {"key": 3, "strict_all": False, "strict_list": [False, False],
                               "loose_all": True, "loose_list": [True, True]}
    assert m["by_instruction"]["punctuation:no_comma"] == {"strict": 0.5, "loose": 0.5, "n": 2}


def test_none_kwargs_are_dropped_like_the_reference():
    # HF's copy of IFEval fills absent arguments with null
    r = row(["punctuation:no_comma", "length_constraints:number_words"],
            [{"num_words": None, "relation": None}, {"num_words": 3, "relation": "at least", "keywords": None}])
    assert check_row(r, "one two three four") == [True, True]


def test_unknown_instruction_is_a_clear_error():
    with pytest.raises(EssaError, match="unknown IFEval instruction"):
        check_row(row(["nope:nothing"]), "x")


def test_reward_fraction_and_options():
    ids = [["punctuation:no_comma", "change_case:english_lowercase"]] * 3
    kw = [[{}, {}]] * 3
    completions = ["the weather is lovely today and we are going for a walk", "Has, both problems", "Intro\nlowercase but, a comma\nmore, commas"]
    assert ifeval_reward(["p"] * 3, completions, instruction_id_list=ids, kwargs=kw, answer=[1, 2, 3]) == [1.0, 0.0, 0.0]
    assert make_ifeval_reward("loose")(["p"] * 3, completions, instruction_id_list=ids, kwargs=kw) == [1.0, 0.0, 0.5]
    assert make_ifeval_reward("strict", all_or_nothing=True)(
        ["p"] * 2, ["the weather is lovely today and we are going for a walk", "Upper but no comma"], instruction_id_list=ids[:2], kwargs=kw[:2]) == [1.0, 0.0]
    assert ifeval_reward(["p"], ["Upper but no comma"], instruction_id_list=ids[:1], kwargs=kw[:1]) == [0.5]
    with pytest.raises(EssaError):
        make_ifeval_reward("medium")


def test_task_splits_and_registry():
    assert get_task("ifeval") is IFEVAL
    test = ifeval_rows("test")
    assert len(test) == 541 and len({r["key"] for r in test}) == 541
    assert IFEVAL.system_prompt == "You are a helpful, honest, and concise assistant." and IFEVAL.sft_target is None
    assert IFEVAL.reward is ifeval_reward and IFEVAL.evaluate is ifeval_evaluate
    assert len(instruction_ids()) == 25


@pytest.mark.parametrize("key", [1122, 1129])
def test_letter_frequency_prompts_are_deterministic(key):
    """The reference draws an unseeded random letter when the kwarg letter is not a-z."""
    r = [x for x in ifeval_rows("test") if x["key"] == key][0]
    response = " ".join(["aaaa bbbb eeee yyyy !!!!!! ####"] * 3)
    results, letters = [], []
    for outside_seed in (1, 2):
        random.seed(outside_seed)
        before = random.getstate()
        insts = build_instructions(r["instruction_id_list"], r["kwargs"], r["prompt"])
        assert random.getstate() == before  # the caller's random state is untouched
        letters.append([i.get_instruction_args() for i in insts if i.id == "keywords:letter_frequency"])
        results.append(ifeval_evaluate([r], [response])["results"])
    assert letters[0] == letters[1]
    assert results[0] == results[1]


def test_whole_test_set_scores_identically_twice():
    rows = ifeval_rows("test")[::9]
    completions = [f"<<T>>\n{r['prompt'][:80].lower()}\nP.S. ok" for r in rows]
    a, b = ifeval_evaluate(rows, completions), ifeval_evaluate(rows, completions)
    assert a == b


def test_nltk_data_comes_from_an_installed_package_offline(tmp_path):
    """Fresh interpreter: no NLTK_DATA, an empty HOME, downloads blocked; sentence counting works."""
    code = textwrap.dedent("""
        import nltk
        def blocked(*a, **k):
            raise RuntimeError("nltk.download must not be called")
        nltk.download = blocked
        from essa.tasks.ifeval import checkers, nltk_data_dir, check_row
        ck = checkers()
        assert ck.util.count_sentences("One here. Two here! Three?") == 3
        found = nltk.data.find("tokenizers/punkt_tab/english/")
        assert str(nltk_data_dir()) in str(found), found
        r = {"prompt": "x", "instruction_id_list": ["length_constraints:number_sentences"],
             "kwargs": [{"num_sentences": 2, "relation": "at least"}]}
        assert check_row(r, "One. Two.") == [True]
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NLTK")}
    env["HOME"] = str(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")
    assert "llama_index" in str(nltk_data_dir())


# ------------------------------------------------------------------ generator

def test_answer_format_task_splits_by_topic_and_checks_the_format():
    train, heldout = make_answer_format()
    assert (train, heldout) == make_answer_format() and make_answer_format(seed=1) != (train, heldout)
    assert len(train) == 300 and len(heldout) == 100
    topic = lambda r: r["key"].split("-")[1]  # noqa: E731
    assert not {topic(r) for r in train} & {topic(r) for r in heldout}  # held-out topics never trained on
    assert len({topic(r) for r in heldout}) == 10
    for r in train[:5] + heldout[:5]:
        check_row(r, "x")
        assert r["instruction_id_list"] == ["detectable_format:constrained_response"]
    rows = heldout[:3]
    texts = ["My answer is no.", "Your answer is yes.", "Yes, I think so."]
    assert ifeval_reward([r["prompt"] for r in rows], texts, [r["instruction_id_list"] for r in rows],
                         [r["kwargs"] for r in rows]) == [1.0, 0.0, 0.0]
    with pytest.raises(EssaError, match="heldout_topics"):
        make_answer_format(heldout_topics=0)


def test_generator_is_deterministic_and_checkable():
    a = make_ifeval_like(120, seed=7)
    assert a == make_ifeval_like(120, seed=7)
    assert a != make_ifeval_like(120, seed=8)
    assert len(a) == 120 and len({r["key"] for r in a}) == 120
    from essa.tasks.ifeval_data import conflicts as all_conflicts
    conflicts = all_conflicts()
    test_prompts = {r["prompt"].strip() for r in ifeval_rows("test")}
    for r in a:
        assert 1 <= len(r["instruction_id_list"]) <= 3
        assert set(r) >= {"key", "prompt", "instruction_id_list", "kwargs"}
        ids = r["instruction_id_list"]
        for i, x in enumerate(ids):
            assert not any(y in conflicts[x] for y in ids[i + 1:]), ids
        # checkable: the stored kwargs rebuild the exact text that is in the prompt
        insts = build_instructions(ids, r["kwargs"], r["prompt"])
        for inst, kw in zip(insts, r["kwargs"]):
            assert inst.build_description(**kw).strip().rstrip(".") in r["prompt"]
        check_row(r, "some response")
        json.dumps(r)
        # never an IFEval test prompt
        assert r["prompt"].strip() not in test_prompts
        assert not any(p in r["prompt"] for p in test_prompts if len(p) > 60)


def test_generated_splits_sizes_and_disjoint_from_test():
    sft, rl = ifeval_rows("sft"), ifeval_rows("rl")
    assert (len(sft), len(rl)) == (1700, 3414)
    assert ifeval_rows("train") == sft + rl
    test_prompts = {r["prompt"] for r in ifeval_rows("test")}
    assert not test_prompts & {r["prompt"] for r in sft + rl}


def test_rejection_sampling_keeps_only_passing_responses():
    rows = [row(["punctuation:no_comma"], key="a"), row(["change_case:english_lowercase"], key="b"),
            row(["startend:quotation"], key="c")]
    calls = []

    def generate(prompts, n):
        calls.append((len(prompts), n))
        return [["has, comma", "no comma here", "no comma here", "also fine"],
                ["Upper", "lower one", "lower two", "Upper again"],
                ["no quotes", "still none", "nope", "nah"]]

    out = rejection_sample(rows, generate, samples_per_prompt=4)
    assert calls == [(3, 4)]
    assert [(r["key"], r["response"]) for r in out] == [("a", "no comma here"), ("b", "lower one")]
    out = rejection_sample(rows, generate, samples_per_prompt=4, max_per_prompt=3)
    assert [(r["key"], r["response"]) for r in out] == [
        ("a", "no comma here"), ("a", "also fine"), ("b", "lower one"), ("b", "lower two")]
    assert rows[0].get("response") is None
    with pytest.raises(EssaError, match="generate returned"):
        rejection_sample(rows, lambda p, n: [["x"]], samples_per_prompt=1)


def test_write_jsonl_atomic(tmp_path):
    rows = make_ifeval_like(5, seed=1)
    path = write_jsonl(rows, tmp_path / "sub" / "data.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert [p.name for p in path.parent.iterdir()] == ["data.jsonl"]


def test_data_cli_rejection_sampling_tiny_model(tiny_model_dir, tmp_path, capsys):
    from essa.cli import main

    out = tmp_path / "sft.jsonl"
    main(["data", "ifeval-like", "--n", "3", "--seed", "2", "--out", str(out), "--responses",
          "--model", tiny_model_dir, "--samples", "2", "--max-new-tokens", "6"])
    printed = capsys.readouterr().out
    assert '"with_responses": true' in printed
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert f"kept {len(rows)} of 3 prompts (2 samples each" in printed  # the summary matches the file
    for r in rows:  # only responses that pass every check of their own prompt are kept
        assert r["response"] and all(check_row(r, r["response"]))
