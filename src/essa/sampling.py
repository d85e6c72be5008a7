"""Decoding settings and token sampling, shared by both decode paths (HF and ``essa.fast_decode``).

Sampling is counter-based: the uniform number that picks row r's token at step t is a hash of
(seed, the row's key, t), where the key is ``prompt index × num_samples + sample index``. So a
completion does not depend on which candidates, rows or micro-batches it was decoded with: the same
(seed, prompt, sample) draws the same numbers on every path and batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from essa import EssaError
from essa.config import help_field


@dataclass
class SamplingConfig:
    """How completions are decoded."""

    max_new_tokens: int = help_field(256, "maximum tokens generated per completion")
    temperature: float = help_field(0.0, "0 = greedy; > 0 samples from softmax(logits / T)")
    top_p: float = help_field(1.0, "nucleus sampling: keep the smallest token set with this much probability")
    num_samples: int = help_field(1, "completions per (candidate, prompt), for avg@k / pass@k")
    seed: int = help_field(0, "seed of the counter-based sampler")
    stop: list[str] = help_field([], "stop strings: generation ends after any of them (they are cut from the text)")

    def validate(self):
        if self.max_new_tokens < 1 or self.num_samples < 1:
            raise EssaError(f"generation needs max_new_tokens >= 1 and num_samples >= 1 (got {self.max_new_tokens}, "
                            f"{self.num_samples})")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise EssaError(f"generation.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise EssaError(f"generation.top_p must be in (0, 1], got {self.top_p}")


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """A splitmix64-style integer hash on int64 tensors (wrapping arithmetic)."""
    x = x * -7046029254386353131  # 0x9E3779B97F4A7C15 as signed int64
    x = (x ^ (x >> 30)) * -4658895280553007687
    x = (x ^ (x >> 27)) * -7723592293110705685
    return x ^ (x >> 31)


def uniform(seed: int, keys: torch.Tensor, step: int) -> torch.Tensor:
    """One uniform in [0, 1) per row from (seed, row key, step); float64."""
    x = splitmix64(splitmix64(keys * 1_000_003 + step) + seed)
    return (x & ((1 << 53) - 1)).double() / float(1 << 53)


def sample_tokens(logits: torch.Tensor, cfg: SamplingConfig, keys: torch.Tensor, step: int) -> torch.Tensor:
    """The next token of every row: argmax (temperature 0), else inverse-CDF sampling of softmax(logits/T)
    restricted to the top-p nucleus, with the row's counter-based uniform."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1).double()
    u = uniform(cfg.seed, keys, step).to(probs.device).unsqueeze(-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        cum = sorted_p.cumsum(-1)
        sorted_p = sorted_p.masked_fill(cum - sorted_p >= cfg.top_p, 0.0)
        cum = sorted_p.cumsum(-1)
        idx = torch.searchsorted(cum, u * cum[:, -1:]).clamp_max(probs.shape[-1] - 1)
        return order.gather(-1, idx).squeeze(-1)
    cum = probs.cumsum(-1)
    return torch.searchsorted(cum, u * cum[:, -1:]).clamp_max(probs.shape[-1] - 1).squeeze(-1)


def row_keys(chunk: Sequence[tuple[int, int, int]], num_samples: int) -> torch.Tensor:
    """The sampler key of each (candidate, prompt, sample) row: prompt × num_samples + sample."""
    return torch.tensor([p * num_samples + s for _, p, s in chunk], dtype=torch.long)


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [N, T], valid [N, T] bool) with every sequence right-aligned (left padding)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    valid = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
        valid[i, T - len(s):] = True
    return ids, valid
