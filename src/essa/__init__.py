"""essa: align language models with evolution strategies over LoRA singular values (ESSA)."""

__version__ = "0.1.0"


class EssaError(Exception):
    """A user-facing error: its message names the problem and the fix, in one line."""
