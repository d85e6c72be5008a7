"""Every config shipped in configs/ builds into its command's config (keys, types and checks), so an
example in the README cannot rot silently."""

from pathlib import Path

import pytest

from essa.config import from_dict, load_yaml

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_builds(path):
    data = load_yaml(path)
    if path.name.startswith("compare-"):
        from essa.compare import build_configs

        own, essa_cfg, grpo_cfg = build_configs(data)
        assert essa_cfg.max_minutes == grpo_cfg.max_minutes == own["budget_minutes"]
    elif path.name.startswith("grpo-"):
        from essa.grpo import GRPORunConfig

        from_dict(GRPORunConfig, data)
    else:
        from essa.trainer import TrainConfig

        data.setdefault("adapter", "runs/sft")  # ifeval-study-cpu.yaml: the study passes it on the command line
        from_dict(TrainConfig, data)
