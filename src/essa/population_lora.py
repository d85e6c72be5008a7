"""The population's per-row LoRA layer: a frozen base projection plus the genome's LoRA path, whose
singular values differ per batch row (one candidate per row), installed in place of the adapted modules.
"""

from __future__ import annotations

import torch
from torch import nn

from essa import EssaError
from essa.genome import Genome

#: dtype of the r-dimensional LoRA path (per-row singular values, the r×r mixing): always fp32, so a
#: small offset is never rounded away (bf16 spacing near 0.58 is 0.0039: ~15 % of N(0, 0.01) offsets
#: would vanish) and the candidate evaluated is exactly the adapter exported.
LORA_DTYPE = torch.float32


class PopulationLoRA(nn.Module):
    """A frozen base projection plus the genome's LoRA path with per-row singular values.

    The projections in→r (Vh_A) and r→out (U_B) run in the base layer's dtype; the r-dimensional
    middle (⊙ s_A, M, ⊙ s_B) in fp32 (``LORA_DTYPE``).
    """

    def __init__(self, base: nn.Module, Vh_A: torch.Tensor, M: torch.Tensor, U_B: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("Vh_A_t", Vh_A.t().contiguous(), persistent=False)  # [in, r]
        self.register_buffer("M", M.to(LORA_DTYPE).contiguous(), persistent=False)  # [r, r] = U_Aᵀ Vh_Bᵀ
        self.register_buffer("U_B_t", U_B.t().contiguous(), persistent=False)    # [r, out], scaling folded in
        self.s_A: torch.Tensor | None = None  # [rows, 1, r] fp32 for the current batch (None: LoRA path off)
        self.s_B: torch.Tensor | None = None

    def forward(self, x):
        y = self.base(x)
        if self.s_A is None:
            return y
        h = (x.to(self.Vh_A_t.dtype) @ self.Vh_A_t).to(LORA_DTYPE) * self.s_A
        h = (h @ self.M) * self.s_B
        return y + (h.to(self.U_B_t.dtype) @ self.U_B_t).to(y.dtype)


def install_population_lora(model: nn.Module, genome: Genome, dtype: torch.dtype | None = None) -> list[PopulationLoRA]:
    """Wrap every module the genome adapts (in place); returns the wrappers in genome order."""
    wrappers = []
    for i, name in enumerate(genome.modules):
        try:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
        except AttributeError:
            raise EssaError(f"the adapter adapts {name!r}, which the model does not have; "
                            f"was the adapter trained for another model?") from None
        if isinstance(base, PopulationLoRA):
            base = base.base
        weight = getattr(base, "weight", None)
        dev = weight.device if weight is not None else next(model.parameters()).device
        dt = dtype or getattr(base, "essa_output_dtype", None) or (
            weight.dtype if weight is not None and weight.is_floating_point() else torch.float32)
        M = genome.U_A[i].t() @ genome.Vh_B[i].t()
        wrapper = PopulationLoRA(base, genome.Vh_A[i].to(dev, dt), M.to(dev, dt),
                                 (genome.U_B[i] * genome.scaling).to(dev, dt))
        setattr(parent, child, wrapper)
        wrappers.append(wrapper)
    return wrappers
