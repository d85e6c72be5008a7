"""`essa demo --fast` end to end on the real SmolLM2-135M-Instruct: SFT → ESSA → test → report."""

import json
from pathlib import Path

import pytest


@pytest.mark.real
def test_demo_fast_real_model(tmp_path):
    from essa.demo import run_demo

    result = run_demo(fast=True, out=str(tmp_path / "demo"))
    run = tmp_path / "demo" / "essa"
    assert Path(result["plot"]).stat().st_size > 1000
    assert (run / "adapters" / "best" / "adapter_config.json").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["genome_dimension"] == 1920 and summary["generations"] == 1
    assert result["test_n"] == 4 and 0 <= result["test_accuracy_essa_best"] <= 1
