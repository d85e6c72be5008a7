"""The SVD genome: a LoRA adapter's singular values as one flat vector (ESSA, arXiv 2507.04453 §3).

For every adapted module, each LoRA factor is decomposed separately with a thin SVD::

    A = U_A · diag(s_A) · Vh_A        (A: r × in)
    B = U_B · diag(s_B) · Vh_B        (B: out × r)

Before the SVD each LoRA pair is **balanced** (``balance=True``, the default): A ← A/c, B ← B·c with
c = sqrt(‖A‖_F / ‖B‖_F), so both factors' singular values are on one scale. B·A (hence ΔW, the
zero-offset adapter and every export's ΔW) is unchanged; what changes is how far an additive offset
moves the model: unbalanced, A's singular values are ≈ 0.58 (PEFT init) and B's ≈ 0.01-0.1 after a
short SFT, so the same offset is a 2 % change through s_A and a 10-100 % change through s_B, and the
A half of the genome is nearly inert (measured in README, "Choices where the paper is silent").

The bases U and Vh are frozen. The trainable values are the top k = ⌊α·r⌋ singular values of every
factor. A *candidate* is an **offset** added to those SFT singular values, so the zero vector is the
SFT adapter itself. Layout of the flat vector (dimension = modules · 2 · k, where modules = layers ·
adapted projections per layer):

    [module 0: s_A[:k], s_B[:k] | module 1: s_A[:k], s_B[:k] | ...]

modules in natural order of their names (layer 0 q/k/o/v ... , layer 1 ...). Any candidate can be
exported as an ordinary PEFT adapter folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from essa import EssaError
from essa.files import fault_point, install_dir, temp_dir_beside

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Genome:
    """Frozen SVD bases and SFT singular values of every LoRA factor of one adapter."""

    modules: list[str]        #: adapted module names, in vector order (e.g. model.layers.0.self_attn.q_proj)
    U_A: torch.Tensor         #: [M, r, r]
    s_A: torch.Tensor         #: [M, r]   SFT singular values of A (descending)
    Vh_A: list[torch.Tensor]  #: per module [r, in]
    U_B: list[torch.Tensor]   #: per module [out, r]
    s_B: torch.Tensor         #: [M, r]
    Vh_B: torch.Tensor        #: [M, r, r]
    rank: int                 #: LoRA rank r
    k: int                    #: trainable singular values per factor, ⌊α·r⌋
    alpha: float              #: α, the fraction of singular values that are trainable
    scaling: float            #: LoRA scaling (lora_alpha / r, or / sqrt(r) with rsLoRA)
    adapter_config: dict      #: the adapter_config.json of the source adapter
    key_prefix: str           #: prefix of the tensor names in adapter_model.safetensors
    balanced: bool = False    #: factors were balanced (A/c, B·c) before the SVD

    @property
    def dimension(self) -> int:
        return len(self.modules) * 2 * self.k

    def info(self) -> dict:
        layers = sorted({int(m) for name in self.modules for m in re.findall(r"\.(\d+)\.", name)[:1]})
        kinds = sorted({name.rsplit(".", 1)[-1] for name in self.modules})
        return {"dimension": self.dimension, "layers": len(layers), "modules": kinds,
                "adapted_modules": len(self.modules), "rank": self.rank, "alpha": self.alpha,
                "trainable_per_factor": self.k, "scaling": self.scaling,
                "formula": f"{len(layers)} layers x {len(kinds)} modules x 2 factors x {self.k} = {self.dimension}"}


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def trainable_count(rank: int, alpha: float) -> int:
    """k = ⌊α·r⌋; fails with a clear message when that is 0 or α is out of (0, 1]."""
    if not 0 < alpha <= 1:
        raise EssaError(f"alpha must be in (0, 1], got {alpha}; alpha is the fraction of each factor's "
                        f"singular values that are trainable")
    k = math.floor(alpha * rank + 1e-9)
    if k < 1:
        raise EssaError(f"alpha={alpha} with LoRA rank {rank} leaves floor(alpha*rank)=0 trainable singular "
                        f"values; use alpha >= {1 / rank:g} or a larger rank")
    return k


def balance_factors(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A/c, B·c) with c = sqrt(‖A‖_F/‖B‖_F): equal Frobenius norms, the same product B·A.

    A zero factor (B right after PEFT's init) has no scale to balance against: returned unchanged.
    """
    na, nb = float(A.norm()), float(B.norm())
    if na == 0.0 or nb == 0.0 or not (math.isfinite(na) and math.isfinite(nb)):
        return A, B
    c = math.sqrt(na / nb)
    return A / c, B * c


def load_genome(adapter_dir: str | os.PathLike, alpha: float = 1.0, balance: bool = True) -> Genome:
    """Read a PEFT LoRA adapter folder, balance every LoRA pair (see the module docstring) and
    decompose every factor."""
    adapter_dir = Path(adapter_dir)
    cfg_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.exists() or not weights.exists():
        raise EssaError(f"{adapter_dir} is not a PEFT adapter folder (need adapter_config.json and "
                        f"adapter_model.safetensors); pass the output of `essa sft`")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise EssaError(f"{adapter_dir} holds a {cfg.get('peft_type')} adapter; ESSA needs a LoRA adapter")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise EssaError(f"{adapter_dir} uses rank_pattern/alpha_pattern; ESSA needs one rank for all modules")
    unsupported = [(k, why) for k, why in (("use_dora", "DoRA's magnitude vectors"), ("modules_to_save", "fully trained "
                   "modules (modules_to_save)"), ("lora_bias", "LoRA biases (lora_bias)"), ("layer_replication",
                   "layer replication")) if cfg.get(k)]
    if unsupported:
        raise EssaError(f"{adapter_dir} uses {unsupported[0][1]}, which the SVD genome cannot represent; train the SFT "
                        f"adapter as plain LoRA ({unsupported[0][0]} off), e.g. with `essa sft`")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise EssaError(f"{weights} is damaged ({str(e).splitlines()[0][:120]}); re-export the adapter") from None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    prefix = None
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None or t.dim() != 2:
            raise EssaError(f"{weights} holds {key!r}, which is not a LoRA A/B matrix of a linear layer (embedding LoRA, "
                            f"DoRA magnitudes, saved modules or biases); the SVD genome cannot represent it: train a "
                            f"plain LoRA adapter on linear layers (e.g. with `essa sft`)")
        factors.setdefault(m["module"], {})[m["factor"]] = t
        prefix = key[: key.index(m["module"])] if prefix is None else prefix
    if not factors:
        raise EssaError(f"{weights} contains no LoRA layers (no *.lora_A/lora_B weights); "
                        f"pass a LoRA adapter trained with `essa sft`")
    broken = [m for m, f in factors.items() if set(f) != {"A", "B"}]
    if broken:
        raise EssaError(f"LoRA module {broken[0]} lacks its A or B factor; the adapter file is incomplete")
    modules = sorted(factors, key=_natural)
    rank = int(cfg.get("r", factors[modules[0]]["A"].shape[0]))
    k = trainable_count(rank, alpha)
    lora_alpha = cfg.get("lora_alpha", rank)
    scaling = lora_alpha / math.sqrt(rank) if cfg.get("use_rslora") else lora_alpha / rank

    U_A, s_A, Vh_A, U_B, s_B, Vh_B = [], [], [], [], [], []
    for name in modules:
        A, B = factors[name]["A"].double(), factors[name]["B"].double()
        if A.shape[0] != rank or B.shape[1] != rank:
            raise EssaError(f"module {name} has rank {A.shape[0]}, expected {rank} from adapter_config.json")
        if balance:
            A, B = balance_factors(A, B)
        u, s, vh = torch.linalg.svd(A, full_matrices=False)
        U_A.append(u), s_A.append(s), Vh_A.append(vh)
        u, s, vh = torch.linalg.svd(B, full_matrices=False)
        U_B.append(u), s_B.append(s), Vh_B.append(vh)
    f32 = lambda xs: [x.float().contiguous() for x in xs]  # noqa: E731
    return Genome(modules=modules, U_A=torch.stack(f32(U_A)), s_A=torch.stack(f32(s_A)),
                  Vh_A=f32(Vh_A), U_B=f32(U_B), s_B=torch.stack(f32(s_B)), Vh_B=torch.stack(f32(Vh_B)),
                  rank=rank, k=k, alpha=alpha, scaling=float(scaling),
                  adapter_config=cfg, key_prefix=prefix or "", balanced=bool(balance))


def singular_values(genome: Genome, offsets: torch.Tensor, clamp_min: float | None = None):
    """Singular values of every factor for a batch of candidates.

    offsets: [K, dimension] (or [dimension]). Returns (s_A, s_B), each [K, M, r]: the SFT values with
    the offsets added to the top k of every factor (the rest stay at their SFT values), optionally
    clamped from below.
    """
    offsets = torch.as_tensor(offsets, dtype=torch.float32)
    squeeze = offsets.dim() == 1
    offsets = offsets.reshape(-1, offsets.shape[-1])
    if offsets.shape[-1] != genome.dimension:
        raise EssaError(f"candidate has {offsets.shape[-1]} values but the genome has dimension "
                        f"{genome.dimension}; was it made for another adapter or alpha?")
    K, M, k = offsets.shape[0], len(genome.modules), genome.k
    off = offsets.reshape(K, M, 2, k)
    s_A = genome.s_A.unsqueeze(0).repeat(K, 1, 1)
    s_B = genome.s_B.unsqueeze(0).repeat(K, 1, 1)
    s_A[:, :, :k] += off[:, :, 0]
    s_B[:, :, :k] += off[:, :, 1]
    if clamp_min is not None:
        s_A, s_B = s_A.clamp_min(clamp_min), s_B.clamp_min(clamp_min)
    return (s_A[0], s_B[0]) if squeeze else (s_A, s_B)


def factors(genome: Genome, offset, clamp_min: float | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rebuild (A, B) of every module for one candidate offset."""
    s_A, s_B = singular_values(genome, torch.as_tensor(offset).reshape(-1), clamp_min)
    out = {}
    for i, name in enumerate(genome.modules):
        A = genome.U_A[i] @ torch.diag(s_A[i]) @ genome.Vh_A[i]
        B = genome.U_B[i] @ torch.diag(s_B[i]) @ genome.Vh_B[i]
        out[name] = (A, B)
    return out


def export_adapter(genome: Genome, offset, out_dir: str | os.PathLike, clamp_min: float | None = None,
                   dtype: torch.dtype = torch.float32, metadata: dict | None = None) -> Path:
    """Write the candidate as a PEFT adapter folder (atomically: the folder appears complete or not at all)."""
    out_dir = Path(out_dir)
    tensors = {}
    for name, (A, B) in factors(genome, offset, clamp_min).items():
        tensors[f"{genome.key_prefix}{name}.lora_A.weight"] = A.to(dtype).contiguous()
        tensors[f"{genome.key_prefix}{name}.lora_B.weight"] = B.to(dtype).contiguous()
    tmp = temp_dir_beside(out_dir)
    try:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(genome.adapter_config, indent=2))
        (tmp / "essa_genome.json").write_text(json.dumps({
            "alpha": genome.alpha, "dimension": genome.dimension, "clamp_min": clamp_min,
            "offset": [float(x) for x in torch.as_tensor(offset).reshape(-1)], **(metadata or {})}))
        fault_point("export")
        install_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
