"""House rules that keep the package readable: modules import in one direction (no cycles, also none
hidden in function-level imports), no private name crosses a module boundary, one chat-message rule."""

from __future__ import annotations

import ast
from pathlib import Path

import essa

SRC = Path(essa.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """module -> [(imported essa module, names)] for every import statement, at any depth."""
    out = {}
    for path in SRC.rglob("*.py"):
        mod, edges = _module_name(path), []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("essa") and node.level == 0:
                names = [a.name for a in node.names]
                submods = [f"{node.module}.{n}" for n in names if (SRC.parent / f"{node.module}.{n}".replace(".", "/")).with_suffix(".py").exists()]
                edges.append((node.module, [n for n in names if f"{node.module}.{n}" not in submods]))
                edges += [(m, []) for m in submods]
            elif isinstance(node, ast.Import):
                edges += [(a.name, []) for a in node.names if a.name.startswith("essa.")]
        out[mod] = edges
    return out


def test_modules_import_in_one_direction():
    graph = {m: {t for t, _ in edges if t != m and t != "essa"} for m, edges in _imports().items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t in graph and not state.get(t):
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if not state.get(m):
            visit(m)


def test_no_private_name_crosses_a_module_boundary():
    bad = [(m, t, n) for m, edges in _imports().items() for t, names in edges for n in names
           if n.startswith("_") and not n.startswith("__") and t != m]
    assert not bad, bad


def test_one_rule_for_the_system_turn(tiny_model_dir):
    """None or "" adds no system turn, in generation prompts and SFT examples alike."""
    from essa.chat import chat_messages, chat_prompts
    from essa.models import load_tokenizer
    from essa.sft import encode_example

    assert chat_messages("hi", "") == chat_messages("hi", None) == [{"role": "user", "content": "hi"}]
    assert chat_messages("hi", "Be brief.")[0] == {"role": "system", "content": "Be brief."}
    tok = load_tokenizer(tiny_model_dir)
    assert chat_prompts(tok, ["hi"], "") == chat_prompts(tok, ["hi"], None)
    assert chat_prompts(tok, ["hi"], "Be brief.") != chat_prompts(tok, ["hi"], None)
    # SFT renders its examples with the same rule: "" trains exactly like no system prompt
    assert encode_example(tok, "hi", "ok", "", 64) == encode_example(tok, "hi", "ok", None, 64)
    assert encode_example(tok, "hi", "ok", "Be brief.", 64) != encode_example(tok, "hi", "ok", None, 64)


def test_tests_use_only_public_names():
    """Tests exercise the public surface: no private name imported from an essa module."""
    import re

    tests = Path(__file__).parent
    bad = [(p.name, m.group(0)) for p in tests.glob("test_*.py")
           for m in re.finditer(r"from essa[\w.]* import [^\n]*\b_[a-z]\w*", p.read_text())]
    assert not bad, bad
