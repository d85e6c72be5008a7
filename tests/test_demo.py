"""`essa demo --fast` end to end on the real SmolLM2-135M-Instruct: shipped SFT adapter → ESSA → held-out test → report."""

import hashlib
import json
from pathlib import Path

import pytest


def test_demo_ships_its_sft_adapter():
    from essa.demo import demo_adapter
    from essa.genome import load_genome

    adapter = demo_adapter()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and sorted(cfg["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert cfg["base_model_name_or_path"] == "smollm2-135m-instruct"
    assert load_genome(adapter).dimension == 1920
    # the bytes are those PROVENANCE.md records
    provenance = (adapter.parent.parent / "PROVENANCE.md").read_text()
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert hashlib.sha256((adapter / f).read_bytes()).hexdigest() in provenance, f


def test_demo_refuses_a_folder_that_is_not_its_own(tmp_path):
    from essa import EssaError
    from essa.demo import run_demo

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.jsonl").write_text("user data\n")
    with pytest.raises(EssaError, match="not an essa demo folder"):
        run_demo(fast=True, out=str(tmp_path / "mine"))
    assert (tmp_path / "mine" / "train.jsonl").read_text() == "user data\n"
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["train.jsonl"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(EssaError, match="is a file"):
        run_demo(fast=True, out=str(tmp_path / "file"))


@pytest.mark.real
def test_demo_fast_real_model(tmp_path):
    from essa.demo import run_demo

    result = run_demo(fast=True, out=str(tmp_path / "demo"))
    run = tmp_path / "demo" / "essa"
    assert Path(result["plot"]).stat().st_size > 1000
    assert (run / "adapters" / "best" / "adapter_config.json").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["genome_dimension"] == 1920 and summary["generations"] == 1
    assert result["heldout_n"] == 8 and 0 <= result["heldout_essa"] <= 1
    lo, hi = result["heldout_gain_ci95"]
    assert lo <= result["heldout_gain"] <= hi
    # the held-out questions are about topics the training questions never mention
    topics = lambda name: {json.loads(x)["key"].split("-")[1] for x in (tmp_path / "demo" / name).read_text().splitlines()}  # noqa: E731
    assert not topics("train.jsonl") & topics("heldout.jsonl")
    assert (tmp_path / "demo" / "essa-demo.json").is_file()  # marked: a second demo run may replace it
