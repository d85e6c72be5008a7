"""Small builders shared by the tests (importable because pytest puts tests/ on sys.path)."""

import copy

import torch
from peft import LoraConfig, get_peft_model


def random_adapter(model, path, seed=0, std=None, rank=8, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    """Save a PEFT LoRA adapter with random non-zero A and B (optionally N(0, std)) for ``model``."""
    torch.manual_seed(seed)
    pm = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False))
    if std is not None:
        for n, p in pm.named_parameters():
            if "lora_" in n:
                torch.nn.init.normal_(p, std=std)
    pm.save_pretrained(path)
    return path


def tiny_sft_adapter(model_dir, path):
    """The rank-4 q/v LoRA the training tests start from: a random adapter for the tiny model in ``model_dir``."""
    from essa.models import load_model

    model, _ = load_model(model_dir, device="cpu", dtype="float32")
    return random_adapter(model, path, rank=4, targets=("q_proj", "v_proj"))
