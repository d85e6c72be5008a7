"""Chat messages and prompt token ids: one rule for every command (SFT, generation, GRPO, reward models).

A system prompt that is None or empty adds no system turn (so `system_prompt: ""` trains and generates
the same way); otherwise it is the first message.
"""

from __future__ import annotations

from typing import Sequence


def chat_messages(prompt: str, system_prompt: str | None = None, response: str | None = None) -> list[dict]:
    """[system?, user = prompt, assistant = response?] as chat-template messages."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": prompt})
    if response is not None:
        messages.append({"role": "assistant", "content": response})
    return messages


def chat_prompts(tokenizer, prompts: Sequence[str], system_prompt: str | None = None) -> list[list[int]]:
    """Token ids of each user prompt wrapped in the chat template, ready for generation (a tokenizer
    without a chat template gets ``system prompt + blank line + prompt``)."""
    out = []
    for p in prompts:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(chat_messages(p, system_prompt), tokenize=False, add_generation_prompt=True)
        else:
            text = (system_prompt + "\n\n" if system_prompt else "") + p
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out
