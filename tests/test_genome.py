"""SVD genome: round trip, offsets, dimension, export/reload, alpha edge cases, bad adapters."""

import copy
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from essa import EssaError
from essa.cli import main
from essa.genome import export_adapter, factors, load_genome, singular_values, trainable_count
from essa.models import tiny_llama

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def make_adapter(path, rank=8, layers=2, seed=0, modules=MODULES):
    base = tiny_llama(seed=seed, layers=layers)
    torch.manual_seed(seed + 1)
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=modules,
                                                        init_lora_weights=False))
    pm.save_pretrained(path)
    return base, path


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("adapter") / "a")


def delta_w(A, B):
    return B.double() @ A.double()


def test_zero_offset_reproduces_delta_w(adapter):
    _, path = adapter
    g = load_genome(path)
    orig = load_file(str(path / "adapter_model.safetensors"))
    rebuilt = factors(g, np.zeros(g.dimension))
    assert len(rebuilt) == 2 * 4
    for name, (A, B) in rebuilt.items():
        key = next(k for k in orig if k.endswith(f"{name}.lora_A.weight"))
        A0, B0 = orig[key], orig[key.replace("lora_A", "lora_B")]
        ref = delta_w(A0, B0)
        err = (delta_w(A, B) - ref).norm() / ref.norm()
        assert err <= 1e-5, (name, err)


def test_dimension_formula_and_layout(adapter):
    _, path = adapter
    g = load_genome(path)
    assert g.dimension == 2 * 4 * 2 * 8
    info = g.info()
    assert (info["layers"], info["rank"], info["dimension"]) == (2, 8, 128)
    assert sorted(info["modules"]) == sorted(MODULES)
    # offset layout: [module0 A(k), module0 B(k), module1 A(k), ...]
    off = np.zeros(g.dimension, dtype=np.float32)
    off[8 + 3] = 0.5  # module 0, factor B, value 3
    sA, sB = singular_values(g, off)
    assert torch.allclose(sA, g.s_A)
    assert torch.isclose(sB[0, 3], g.s_B[0, 3] + 0.5)
    assert torch.allclose(sB[1:], g.s_B[1:])


def test_alpha_edge_cases(adapter):
    _, path = adapter
    assert load_genome(path, alpha=0.5).dimension == 2 * 4 * 2 * 4
    assert trainable_count(8, 0.125) == 1
    with pytest.raises(EssaError, match="0 trainable"):
        load_genome(path, alpha=0.1)
    with pytest.raises(EssaError, match="alpha must be in"):
        trainable_count(8, 1.5)
    # alpha < 1: the untrained singular values stay at their SFT values
    g = load_genome(path, alpha=0.5)
    sA, _ = singular_values(g, np.ones(g.dimension, dtype=np.float32))
    assert torch.allclose(sA[:, 4:], g.s_A[:, 4:]) and torch.allclose(sA[:, :4], g.s_A[:, :4] + 1)


def test_offsets_change_only_their_module(adapter):
    _, path = adapter
    g = load_genome(path)
    off = np.zeros(g.dimension, dtype=np.float32)
    off[:16] = 0.3  # module 0 only
    base, moved = factors(g, np.zeros(g.dimension)), factors(g, off)
    names = g.modules
    assert not torch.allclose(base[names[0]][0], moved[names[0]][0])
    for n in names[1:]:
        assert torch.allclose(base[n][0], moved[n][0]) and torch.allclose(base[n][1], moved[n][1])


def test_export_reload_equals_rebuilt(adapter, tmp_path):
    base, path = adapter
    g = load_genome(path)
    off = np.random.default_rng(0).normal(0, 0.2, g.dimension).astype(np.float32)
    out = export_adapter(g, off, tmp_path / "cand")
    assert json.loads((out / "essa_genome.json").read_text())["dimension"] == g.dimension
    model = PeftModel.from_pretrained(copy.deepcopy(base), out)
    rebuilt = factors(g, off)
    for name, (A, B) in rebuilt.items():
        layer = model.base_model.model.get_submodule(name)
        assert torch.allclose(layer.lora_A["default"].weight, A, atol=1e-6)
        assert torch.allclose(layer.lora_B["default"].weight, B, atol=1e-6)
    # and the zero-offset export behaves exactly like the source adapter
    ids = torch.randint(0, 256, (2, 7))
    src = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    zero = PeftModel.from_pretrained(copy.deepcopy(base), export_adapter(g, np.zeros(g.dimension), tmp_path / "z")).eval()
    with torch.no_grad():
        assert torch.allclose(src(ids).logits, zero(ids).logits, atol=1e-4)


def test_bad_adapters(tmp_path, adapter):
    _, path = adapter
    with pytest.raises(EssaError, match="not a PEFT adapter"):
        load_genome(tmp_path)
    bad = tmp_path / "nolora"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((path / "adapter_config.json").read_text())
    save_file({"something.weight": torch.zeros(2, 2)}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(EssaError, match="not a LoRA A/B matrix"):
        load_genome(bad)
    save_file({}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(EssaError, match="no LoRA layers"):
        load_genome(bad)
    g = load_genome(path)
    with pytest.raises(EssaError, match="dimension"):
        singular_values(g, np.zeros(g.dimension + 1))


def test_cli_genome_info(adapter, capsys):
    _, path = adapter
    assert main(["genome", "info", "--adapter", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dimension"] == 128 and info["layers"] == 2 and info["rank"] == 8
    assert main(["genome", "info", "--adapter", str(path), "--alpha", "0.1"]) == 2
    assert "0 trainable" in capsys.readouterr().err
