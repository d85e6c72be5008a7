"""The `essa` command line: sft · genome info · eval · train · grpo · compare · report · data · demo."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import sys
import time
import typing
from pathlib import Path

import yaml

from essa import EssaError
from essa.config import apply_overrides, from_dict, help_text, load_yaml, set_dotted


def _add_fields(parser: argparse.ArgumentParser, cls, section: str = "") -> None:
    """One --flag per field of a config dataclass (values parsed as YAML); a section's fields as
    --section-field (``--distributed-workers 2`` sets distributed.workers)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            _add_fields(parser, hints[f.name], section=f"{section}{f.name}.")
            continue
        parser.add_argument(f"--{(section + f.name).replace('_', '-').replace('.', '-')}", dest=section + f.name,
                            default=argparse.SUPPRESS, metavar="VALUE", help=f.metadata.get("help", "").replace("%", "%%"))
    if section:
        return
    parser.add_argument("--config", help="YAML file with any of these fields (see configs/; flags and --set override it)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (dotted keys for sections, e.g. generation.max_new_tokens=64), repeatable")


def flag_values(cls, args) -> dict:
    """The field flags given on the command line, parsed as YAML: {"popsize": 8, "distributed.workers": 2}."""
    fields = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for name, raw in vars(args).items():
        if name.split(".")[0] in fields:
            try:
                out[name] = yaml.safe_load(raw) if isinstance(raw, str) else raw
            except yaml.YAMLError:
                raise EssaError(f"--{name.replace('_', '-').replace('.', '-')} {raw!r} is not a YAML value; quote it") from None
    return out


def build_config(cls, args) -> typing.Any:
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    for name, value in flag_values(cls, args).items():
        set_dotted(data, name, value)
    data = apply_overrides(data, getattr(args, "set", []))
    return from_dict(cls, data)


def cmd_sft(args):
    from essa.sft import SFTConfig, run_sft

    out = run_sft(build_config(SFTConfig, args))
    print(json.dumps({"adapter": str(out)}))


def cmd_genome_info(args):
    from essa.genome import load_genome

    print(json.dumps(load_genome(args.adapter, args.alpha).info(), indent=2))


def cmd_eval(args):
    from essa.evaluate import EvalConfig, run_eval

    print(json.dumps(run_eval(build_config(EvalConfig, args)), indent=2))


def cmd_train(args):
    from essa.trainer import TrainConfig, resume, train

    if args.resume:
        flags = flag_values(TrainConfig, args)
        if args.config or args.set or any(not n.startswith("distributed.") for n in flags):
            raise EssaError("--resume continues a run with the settings it was started with; drop --config/--set and "
                            "field flags except --distributed-* (or start a new run with them)")
        # where it runs may change (fewer workers after a lost node, another cluster): the results do not depend on it
        summary = resume(args.resume, {n.partition(".")[2]: v for n, v in flags.items()})
    else:
        summary = train(build_config(TrainConfig, args))
    print(json.dumps(summary, indent=2))


def cmd_grpo(args):
    from essa.grpo import GRPORunConfig, run_grpo

    print(json.dumps(run_grpo(build_config(GRPORunConfig, args)), indent=2))


def cmd_compare(args):
    from essa.compare import run_compare

    if not args.config:
        raise EssaError("essa compare needs --config FILE.yaml (see configs/compare-gsm8k.yaml)")
    data = apply_overrides(load_yaml(args.config), args.set)
    print(json.dumps(run_compare(data, args.budget_minutes), indent=2))


def cmd_report(args):
    from essa.report import write_report

    print(json.dumps(write_report(args.run_dir), indent=2))


def cmd_data_ifeval_like(args):
    from essa.tasks.ifeval_data import make_ifeval_like, rejection_sample, write_jsonl

    if args.n < 1:
        raise EssaError(f"--n must be >= 1, got {args.n}")
    out = Path(args.out)
    if out.is_dir():
        raise EssaError(f"--out {out} is a folder; pass a .jsonl file path")
    if out.exists() and not args.overwrite:
        raise EssaError(f"--out {out} exists; choose another file or pass --overwrite to replace it")
    rows = make_ifeval_like(args.n, args.seed)
    if args.responses:
        from essa.chat import chat_prompts
        from essa.engines import build_engine
        from essa.sampling import SamplingConfig

        engine = build_engine(args.model, None)
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95,
                                  num_samples=args.samples, seed=args.seed)

        from tqdm import tqdm

        bar = tqdm(total=len(rows) * args.samples, desc="rejection sampling", unit="row")

        def generate(prompts, n):
            base = bar.n
            out = engine.generate(chat_prompts(engine.tokenizer, prompts), None, sampling,
                                  progress=lambda done, _: bar.update(base + done - bar.n))[0]
            return [[c.text for c in samples] for samples in out]

        t0, n_prompts = time.perf_counter(), len(rows)
        # 64 prompts per call: the sampler's keys count prompts within a call, so this fixes the output
        rows = rejection_sample(rows, generate, args.samples, batch_size=64)
        bar.close()
        print(f"essa: kept {len(rows)} of {n_prompts} prompts ({args.samples} samples each, "
              f"{time.perf_counter() - t0:.0f} s, {engine.stats.useful_tokens} tokens)")
    path = write_jsonl(rows, args.out)
    print(json.dumps({"rows": len(rows), "out": str(path), "with_responses": bool(args.responses)}, indent=2))


def cmd_demo(args):
    from essa.demo import run_demo

    run_demo(fast=args.fast, out=args.out, seed=args.seed)


def cmd_config_help(args):
    from essa.evaluate import EvalConfig
    from essa.grpo import GRPORunConfig
    from essa.sft import SFTConfig
    from essa.trainer import TrainConfig

    cls = {"train": TrainConfig, "sft": SFTConfig, "eval": EvalConfig, "grpo": GRPORunConfig}[args.which]
    print(help_text(cls))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="essa", description="Align LLMs with evolution strategies over LoRA singular values (ESSA).")
    sub = p.add_subparsers(dest="command", required=True)

    from essa.evaluate import EvalConfig

    s = sub.add_parser("sft", help="SFT warm start: train a LoRA adapter (PEFT)")
    try:
        from essa.sft import SFTConfig
        _add_fields(s, SFTConfig)
    except ImportError:
        pass
    s.set_defaults(func=cmd_sft)

    g = sub.add_parser("genome", help="inspect the SVD genome of an adapter")
    gsub = g.add_subparsers(dest="genome_command", required=True)
    gi = gsub.add_parser("info", help="print dimension, layers, modules, rank as JSON")
    gi.add_argument("--adapter", required=True, help="PEFT LoRA adapter folder")
    gi.add_argument("--alpha", type=float, default=1.0, help="fraction of singular values per factor that are trainable")
    gi.set_defaults(func=cmd_genome_info)

    e = sub.add_parser("eval", help="evaluate a model/adapter on gsm8k, math500 or ifeval")
    _add_fields(e, EvalConfig)
    e.set_defaults(func=cmd_eval)

    from essa.grpo import GRPORunConfig
    from essa.trainer import TrainConfig

    t = sub.add_parser("train", help="run ESSA (CMA-ES over singular values): a YAML config, flags, or both")
    _add_fields(t, TrainConfig)
    t.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    t.set_defaults(func=cmd_train)

    gr = sub.add_parser("grpo", help="GRPO baseline (TRL GRPOTrainer) from the same SFT adapter, validated like train")
    _add_fields(gr, GRPORunConfig)
    gr.set_defaults(func=cmd_grpo)

    cp = sub.add_parser("compare", help="ESSA vs GRPO for the same wall-clock budget: curves, test, time-to-threshold")
    cp.add_argument("--config", help="YAML: shared fields + `essa:` and `grpo:` sections (see configs/compare-gsm8k.yaml)")
    cp.add_argument("--budget-minutes", type=float, default=None, metavar="M",
                    help="training wall-clock budget of each method (overrides budget_minutes in the config)")
    cp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field (dotted for sections, e.g. essa.popsize=32), repeatable")
    cp.set_defaults(func=cmd_compare)

    r = sub.add_parser("report", help="plots (PNG) and a markdown summary of a run")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)

    d = sub.add_parser("data", help="build training data")
    dsub = d.add_subparsers(dest="data_command", required=True)
    di = dsub.add_parser("ifeval-like", help="IFEval-style prompts with checkable constraints (+ SFT targets by rejection sampling)")
    di.add_argument("--n", type=int, required=True, help="number of prompts")
    di.add_argument("--out", required=True, help="output .jsonl")
    di.add_argument("--seed", type=int, default=0)
    di.add_argument("--responses", action="store_true", help="add SFT targets by rejection sampling with --model")
    di.add_argument("--model", default="smollm2-135m-instruct")
    di.add_argument("--samples", type=int, default=4, help="samples per prompt for rejection sampling")
    di.add_argument("--max-new-tokens", type=int, default=256)
    di.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    di.set_defaults(func=cmd_data_ifeval_like)

    m = sub.add_parser("demo", help="ESSA teaches the default model an answer format, measured on held-out questions (CPU, minutes)")
    m.add_argument("--fast", action="store_true", help="even smaller settings (smoke test)")
    m.add_argument("--out", default="runs/demo", help="folder of the demo's data and ESSA run (default runs/demo)")
    m.add_argument("--seed", type=int, default=0, help="seed of the strategy and the data order")
    m.set_defaults(func=cmd_demo)

    c = sub.add_parser("config-help", help="list every config field with its help")
    c.add_argument("which", choices=["train", "sft", "eval", "grpo"])
    c.set_defaults(func=cmd_config_help)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except EssaError as e:
        print(f"essa: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("essa: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a full disk, a read-only or forbidden path: one line, not a traceback
        if e.errno not in _FS_ERRORS:
            raise
        where = f" {e.filename}" if e.filename else ""
        print(f"essa: error: cannot write{where}: {e.strerror}; {_FS_ERRORS[e.errno]} (files already written are kept; "
              f"an essa train run continues from its last checkpoint with --resume)", file=sys.stderr)
        return 2
    return 0


_FS_ERRORS = {errno.ENOSPC: "free disk space or choose another output folder",
              errno.EDQUOT: "free disk space (quota) or choose another output folder",
              errno.EROFS: "choose an output folder on a writable file system",
              errno.EACCES: "choose a folder you may write to", errno.EPERM: "choose a folder you may write to"}


if __name__ == "__main__":
    sys.exit(main())
