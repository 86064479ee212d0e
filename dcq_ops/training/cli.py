"""The command lines of the training application: ``dcq-train`` (``python -m
dcq_ops.train``) trains; ``python -m dcq_ops.eval`` verifies a checkpoint on
insightface ``.bin`` sets."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Sequence

import torch
import torch.distributed as dist

from dcq_ops.training import loop
from dcq_ops.training.backbones import BACKBONES
from dcq_ops.training.heads import HEADS
from dcq_ops.training.loop import TrainConfig, load_backbone, train
from dcq_ops.training.verification import evaluate_bin


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _field_help() -> dict:
    """Each field's trailing comment in TrainConfig's source: one place documents a setting."""
    import inspect
    import re
    try:
        source = inspect.getsource(TrainConfig)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s{4}(\w+):[^#\n]*#(.*)$", source, re.M)}


_CHOICES = {"head": tuple(HEADS), "margin": ("cosface", "arcface"), "optimizer": ("sgd", "adamw"),
            "schedule": ("cosine", "step"), "amp": ("none", "fp16", "bf16"), "log_format": ("csv", "json"),
            "progress": ("auto", "bar", "lines", "none"), "generator_bn": ("train", "eval"), "backbone": BACKBONES,
            "backend": ("auto", "triton", "chunked", "reference"), "momentum_schedule": loop.MOMENTUM_SCHEDULES,
            "queue_warmup": loop.QUEUE_WARMUPS, "eval_model": loop.EVAL_MODELS}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcq-train", description=loop.__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = TrainConfig()
    helps = _field_help()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kwargs = dict(default=default, help=helps.get(f.name, " "))
        if isinstance(default, bool):
            parser.add_argument(flag, type=_parse_bool, metavar="BOOL", **kwargs)
        elif isinstance(default, list):
            parser.add_argument(flag, type=float if f.name == "decay_at" else str, nargs="*", **kwargs)
        elif f.name in ("queue_size", "steps", "stop_after"):
            parser.add_argument(flag, type=int, **kwargs)
        elif f.name in ("output", "resume"):
            parser.add_argument(flag, type=str, **kwargs)
        else:
            parser.add_argument(flag, type=type(default), choices=_CHOICES.get(f.name), **kwargs)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        config = TrainConfig(**vars(args))
    except ValueError as exc:
        build_parser().error(str(exc))
    result = train(config)
    trainer = result.pop("trainer")
    if trainer.rank == 0 and config.output:
        # final_eval: the feature extractor's verification; final_eval_generator: the
        # weight generator's (with --eval-model generator or both).
        summary = {"config": dataclasses.asdict(config), "steps": result["steps"], "eval_model": config.eval_model,
                   "final_eval": result["final_eval"]}
        if "final_eval_generator" in result:
            summary["final_eval_generator"] = result["final_eval_generator"]
        with open(os.path.join(config.output, "result.json"), "w") as f:
            json.dump({**summary, "elapsed_s": result["elapsed_s"]}, f, indent=2)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return result


def eval_main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m dcq_ops.eval",
                                     description="Verification accuracy of a dcq_ops.train checkpoint on insightface .bin sets")
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by dcq_ops.train")
    parser.add_argument("--bin", action="append", required=True, help="an insightface .bin (repeatable)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    model = load_backbone(args.checkpoint, map_location=args.device).to(args.device)
    results = {}
    for path in args.bin:
        results[os.path.basename(path)] = evaluate_bin(model, path, args.batch_size, device=args.device)
        print(f"{os.path.basename(path)}: " + json.dumps(results[os.path.basename(path)]))
    return results
