"""Exploration: how far a candidate moves the model, and σ₀ calibrated to a target (``sigma0: auto``).

A step size means nothing by itself: offsets are absolute and add to singular values whose scale
depends on the adapter (its rank, its SFT, whether the pair was balanced). What matters is how much
a candidate changes what the model says. So essa measures it, on a few training prompts:

1. the SFT adapter (zero offset) completes each prompt greedily;
2. ``n`` fixed Gaussian directions z (seeded) give candidates σ·z — exactly what a strategy draws in
   its first generation (identity covariance, mean 0);
3. teacher-forced on the SFT completions, the mean per-token KL(SFT ‖ candidate) and the top-1
   agreement with the SFT tokens are computed (one batched forward per σ);
4. σ₀ is the σ whose mean KL hits ``target_kl``, found by bisection in log σ.

KL grows smoothly (≈ quadratically) with σ, which makes the bisection well posed; greedy token
agreement, the quantity that decides whether candidates produce different completions (and so
different rewards), falls as KL grows. The calibration is a pure function of (adapter, prompts,
seed, target): reproducible.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from essa import EssaError
from essa.engine import PopulationEngine

#: Default calibration target, nats per token (see README, "Choices where the paper is silent").
from essa.sampling import SamplingConfig

DEFAULT_TARGET_KL = 2e-3


@dataclass
class Movement:
    """How far candidates move the model from the SFT adapter, teacher-forced on its completions."""

    sigma: float        #: the step size of the candidates
    kl: float           #: mean per-token KL(SFT ‖ candidate), nats, averaged over candidates
    agreement: float    #: fraction of completion tokens where the candidate's top-1 is the SFT token
    kl_per_candidate: list[float]


def kl_and_agreement(ref: torch.Tensor, cand: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor):
    """Per candidate: mean KL(ref ‖ cand) and top-1 agreement with ``tokens`` over masked positions.

    ref: [P, T, V] log-probs; cand: [K, P, T, V]; mask, tokens: [P, T].
    """
    p = ref.exp()
    kl = (p.unsqueeze(0) * (ref.unsqueeze(0) - cand)).sum(-1)            # [K, P, T]
    m = mask.unsqueeze(0).float()
    kl = (kl * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1)
    agree = ((cand.argmax(-1) == tokens.unsqueeze(0)).float() * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1)
    return kl.clamp_min(0).tolist(), agree.tolist()


class MovementProbe:
    """Fixed prompts, SFT completions and Gaussian directions; ``measure(sigma)`` is then one forward."""

    def __init__(self, engine: PopulationEngine, prompt_ids: Sequence[Sequence[int]], n_candidates: int = 4,
                 max_new_tokens: int = 32, seed: int = 0):
        if engine.genome is None:
            raise EssaError("measuring exploration needs an adapter (the engine has no genome)")
        dim = engine.genome.dimension
        self.engine, self.prompt_ids = engine, [list(p) for p in prompt_ids]
        zero = np.zeros((1, dim))
        outs = engine.generate(self.prompt_ids, zero, SamplingConfig(max_new_tokens=max_new_tokens))
        self.completions = [per_prompt[0].token_ids for per_prompt in outs[0]]
        self.z = np.random.Generator(np.random.PCG64(seed)).standard_normal((n_candidates, dim))
        ref, self.mask = engine.completion_logprobs(self.prompt_ids, self.completions, zero)
        self.ref = ref[0]
        T = self.mask.shape[1]
        self.tokens = torch.tensor([c + [0] * (T - len(c)) for c in self.completions], dtype=torch.long)

    def measure(self, sigma: float) -> Movement:
        cand, _ = self.engine.completion_logprobs(self.prompt_ids, self.completions, sigma * self.z)
        kl, agree = kl_and_agreement(self.ref, cand, self.mask, self.tokens)
        return Movement(sigma=float(sigma), kl=float(np.mean(kl)), agreement=float(np.mean(agree)),
                        kl_per_candidate=[float(x) for x in kl])


def calibrate_sigma(probe: MovementProbe, target_kl: float = DEFAULT_TARGET_KL, lo: float = 1e-3,
                    hi: float = 4.0, iters: int = 10) -> tuple[float, list[dict]]:
    """σ whose candidates move the model by ``target_kl`` nats/token; (σ, every measurement made).

    Bisection in log σ between ``lo`` and ``hi``; if even ``hi`` stays below the target, ``hi`` is
    returned (and the log says so), if even ``lo`` exceeds it, ``lo``.
    """
    if not (math.isfinite(target_kl) and target_kl > 0):
        raise EssaError(f"sigma_target_kl must be a positive number of nats per token, got {target_kl!r}")
    log: list[dict] = []

    def f(s: float) -> float:
        m = probe.measure(s)
        log.append(asdict(m))
        return m.kl

    if f(hi) < target_kl:
        return hi, log
    if f(lo) > target_kl:
        return lo, log
    a, b = math.log(lo), math.log(hi)
    for _ in range(iters):
        mid = 0.5 * (a + b)
        if f(math.exp(mid)) < target_kl:
            a = mid
        else:
            b = mid
    # the measured point closest to the target (in log KL)
    best = min(log, key=lambda m: abs(math.log(max(m["kl"], 1e-30)) - math.log(target_kl)))
    return best["sigma"], log
