"""essa: align language models with evolution strategies over LoRA singular values (ESSA)."""

import logging

# torchao (imported by peft/transformers when present) logs kernel-library load failures and pytree
# warnings on CPU builds of torch at every import; they are harmless for essa.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)

__version__ = "0.1.0"


class EssaError(Exception):
    """A user-facing error: its message names the problem and the fix, in one line."""


def __getattr__(name: str):
    """``from essa import ESSAConfig, ESSATrainer`` (the TRL-shaped Python API, imported on first use)."""
    if name in ("ESSAConfig", "ESSATrainer"):
        from essa import api

        return getattr(api, name)
    raise AttributeError(f"module 'essa' has no attribute {name!r}")
