"""Weight-only INT8 / INT4 quantization of the frozen base model for inference (torchao).

Only generation (the population engine: ESSA candidates, validation, ``essa eval``) runs on the
quantized base; SFT trains in full precision, and the genome, its singular values and every
exported adapter are the same whatever the inference precision. ``quantize_base_weights`` runs
*before* the engine installs its ``PopulationLoRA`` wrappers (``essa.engines.build_engine``), so the
per-row LoRA path keeps its own bf16/fp32 buffers and calls the quantized base linear as ``.base``;
on a model that already has wrappers only their ``.base`` linears are touched.

What is quantized: every ``nn.Linear`` of the model (in a decoder LM: attention q/k/v/o and MLP
gate/up/down of every block) **except the output embedding** (``lm_head``). The input embedding is
not a linear and stays as it is (why ``lm_head`` stays in full precision: benchmarks/NOTES.md).

Modes (torchao >= 0.18 tensor subclasses, eager mode: no ``torch.compile`` needed):

* ``int8``: ``Int8WeightOnlyConfig`` — symmetric int8, one scale per output row. The matmul converts
  the int8 weight to the activation dtype on the fly (CPU and CUDA). ~4× smaller than fp32 weights,
  ~2× smaller than bf16.
* ``int4``: asymmetric int4 with one bf16 scale and zero point per group of ``group_size`` (default
  32) input features, packed two values per byte, computed with PyTorch's int4 "tinygemm" kernels:

  - CPU: torchao's ``Int4OpaqueTensor`` (``aten._weight_int4pack_mm_for_cpu``). The kernel is fast
    with bf16 activations but ~20× slower with fp32 ones, so on an fp32 model the quantized linears
    get bf16 scales and cast their input to bf16 and their output back (``QuantizedLinear``).
  - CUDA (compute capability >= 8.0): ``Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")``
    (``aten._weight_int4pack_mm``); bf16 weights/scales, the input is cast to bf16 by torchao. The
    kernel pads in_features to a multiple of 1024.

  Linears whose in_features is not a multiple of ``group_size`` stay in full precision.

The quantized linears become ``QuantizedLinear`` (class swapped in place). The per-row LoRA path
should run in the layer's original dtype, ``QuantizedLinear.essa_output_dtype``: for int4 the
weight's ``dtype`` is bf16 (its scales), even on an fp32 model.

Agreement of the quantized engines with the fp32 model, measured: benchmarks/NOTES.md.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from essa import EssaError

MODES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)


def _torchao():
    """Import torchao quietly (its CUDA-only extension libraries log warnings on a CPU torch)."""
    loggers = [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao  # noqa: F401
            from torchao.quantization import quantize_  # noqa: F401
    except ImportError as e:
        raise EssaError(f"quantization needs the torchao package ({e}); run `pip install --no-deps torchao` "
                        f"or use --quantization none") from None
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
    import torchao

    return torchao


def _config(mode: str, device: torch.device, group_size: int):
    """(torchao config, weight dtype to quantize from or None, cast input to bf16?) for mode/device."""
    torchao = _torchao()
    version = getattr(torchao, "__version__", "?")
    try:
        from torchao.quantization import Int8WeightOnlyConfig
        if mode == "int8":
            return Int8WeightOnlyConfig(set_inductor_config=False), None, False
        if group_size not in INT4_GROUP_SIZES:
            raise EssaError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
        if device.type == "cpu":
            from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig
            if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
                raise EssaError(f"int4 on CPU needs torch's _weight_int4pack_mm_for_cpu kernel, which torch "
                                f"{torch.__version__} lacks; use --quantization int8 or a newer torch")
            return PrototypeInt4WeightOnlyConfig(group_size=group_size, set_inductor_config=False), torch.bfloat16, True
        if device.type == "cuda":
            from torchao.quantization import Int4WeightOnlyConfig
            cc = torch.cuda.get_device_capability(device)
            if cc[0] < 8:
                raise EssaError(f"int4 on CUDA needs compute capability >= 8.0 (tinygemm kernel), this GPU has "
                                f"{cc[0]}.{cc[1]}; use --quantization int8")
            return (Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d",
                                         set_inductor_config=False), torch.bfloat16, False)
    except ImportError as e:
        raise EssaError(f"torchao {version} lacks what --quantization {mode} needs ({e}); "
                        f"run `pip install --no-deps -U torchao` (tested with 0.18) or use --quantization none") from None
    raise EssaError(f"int4 quantization runs on CPU or CUDA, not on {device.type}; "
                    f"use --quantization int8 or --device cpu")


def is_quantized(t) -> bool:
    """Whether a tensor is a torchao quantized tensor subclass."""
    return type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__")


def _targets(model: nn.Module, mode: str, group_size: int) -> list[tuple[str, nn.Linear]]:
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = getattr(out_emb, "weight", None)
    targets = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or mod is out_emb or "lora_" in name:
            continue
        if tied is not None and mod.weight is tied:
            continue
        if is_quantized(mod.weight) or not mod.weight.is_floating_point():
            continue
        if mode == "int4" and mod.in_features % group_size:
            continue  # stays in full precision
        targets.append((name, mod))
    return targets


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a torchao quantized tensor (the class is swapped in place, so
    module identity, hooks and ``PopulationLoRA.base`` references stay valid). Not a plain
    ``nn.Linear``, so code that concatenates plain weights (``essa.fast_decode``) calls it as a module.

    ``essa_compute_dtype``: when set, the input is cast to it for the kernel and the output back to the input's
    dtype (CPU int4 on an fp32 model: the int4 kernel is fast only with bf16 activations).
    """

    essa_compute_dtype: torch.dtype | None = None
    #: dtype of the layer before quantization (= of its output on the model's activations); the
    #: per-row LoRA path should use it rather than ``weight.dtype`` (bf16 scales for int4)
    essa_output_dtype: torch.dtype | None = None

    def forward(self, x):
        cdt = self.essa_compute_dtype
        if cdt is None or x.dtype == cdt:
            return F.linear(x, self.weight, self.bias)
        return F.linear(x.to(cdt), self.weight, self.bias).to(x.dtype)


def quantize_base_weights(model: nn.Module, mode: str, group_size: int = 32) -> nn.Module:
    """Weight-only quantization of the base linear layers of ``model`` (in place); returns the model.

    mode: ``int8`` or ``int4`` (see the module docstring for what each does where). ``lm_head`` and
    the embeddings stay in full precision. Must run after the model is on its device.
    """
    if mode not in MODES:
        raise EssaError(f"unknown quantization {mode!r}; use one of: none, {', '.join(MODES)}")
    done = getattr(model, "essa_quantization", None)
    if done == mode:
        return model
    if done is not None:
        raise EssaError(f"the model is already quantized to {done}; reload it to quantize to {mode}")
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        raise EssaError("the model has no floating-point weights to quantize; use --quantization none")
    device = param.device
    cfg, weight_dtype, cast_input = _config(mode, device, group_size)
    targets = _targets(model, mode, group_size)
    if not targets:
        raise EssaError(f"no linear layer of the model can be quantized to {mode}"
                        + (f" (in_features must be a multiple of {group_size})" if mode == "int4" else "")
                        + "; use --quantization none" + (" or int8" if mode == "int4" else ""))
    from torchao.quantization import quantize_

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, mod in targets:
            out_dtype = mod.weight.dtype
            if weight_dtype is not None and mod.weight.dtype != weight_dtype:
                mod.to(weight_dtype)
            try:
                quantize_(mod, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear), device=device)
            except (RuntimeError, AssertionError, NotImplementedError, ValueError) as e:
                raise EssaError(f"torchao could not quantize to {mode} on {device} "
                                f"({str(e).splitlines()[0][:200]}); use --quantization int8 or none") from None
            mod.__class__ = QuantizedLinear
            mod.essa_output_dtype = out_dtype
            if cast_input and out_dtype != torch.bfloat16:
                mod.essa_compute_dtype = torch.bfloat16
    model.essa_quantization = mode
    model.essa_quantized_layers = len(targets)
    return model


def _leaves(t):
    """(storage key, bytes) of the plain tensors that really hold t's data (inner tensors of a torchao subclass)."""
    if is_quantized(t):
        names, _ = t.__tensor_flatten__()
        for n in names:
            inner = getattr(t, n)
            if inner is not None:
                yield from _leaves(inner)
    else:
        key = (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else (id(t),)
        yield key, t.untyped_storage().nbytes() if t.device.type != "meta" else t.nbytes


def model_memory_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, counting shared storage (tied weights) once and
    the packed data + scales of quantized weights (not their logical fp size)."""
    seen, total = set(), 0
    tensors = [p for _, p in model.named_parameters(remove_duplicate=False)]
    tensors += [b for _, b in model.named_buffers(remove_duplicate=False)]
    for t in tensors:
        for key, n in _leaves(t):
            if key not in seen:
                seen.add(key)
                total += n
    return total
