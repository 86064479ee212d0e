"""The training command line, ``dcq-train`` (``python -m dcq_ops.train``): one
flag per :class:`~dcq_ops.training.config.TrainConfig` field, checked by the same
bounds and choices as the config; a setting that cannot run is a usage error
(status 2). (``python -m dcq_ops.eval`` is :mod:`dcq_ops.training.evaluate`.)"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence

import torch.distributed as dist

from dcq_ops.atomic_write import atomic_write
from dcq_ops.training import trainer as trainer_module
from dcq_ops.training.config import CHOICES, FIELD_BOUNDS, ConfigError, TrainConfig, parse_device
from dcq_ops.training.runtime import (CommunicationError, end_process, ended_multi_rank, exit_now,
                                      is_communication_error)
from dcq_ops.training.step_guard import TrainingError
from dcq_ops.training.trainer import Trainer


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {text!r}")


def _argument_type(parse, name: str):
    """An argparse ``type`` from a function that raises ValueError with the rule: argparse
    then says "argument --flag: <the rule>" (a bare ValueError would only say "invalid
    value")."""
    def convert(text: str):
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    convert.__name__ = name
    return convert


def _data_path(text: str) -> str:
    """--data: "synthetic", an image folder, or a RecordIO set whose .idx is there."""
    if text == "synthetic":
        return text
    if not os.path.exists(text):
        raise ValueError(f"no such file or directory: {text!r} (expected 'synthetic', an image folder, a .rec or "
                         f"a folder holding train.rec and train.idx)")
    # Imported here: importing the application does not import the RecordIO package.
    from dcq_ops.training.recordio import is_recordio, resolve_paths
    if is_recordio(text):
        resolve_paths(text)  # raises when the .idx is missing, naming it
    elif not os.path.isdir(text):
        raise ValueError(f"{text!r} is neither a folder nor a .rec file")
    return text


def _resume_path(text: str) -> str:
    if text != "auto" and not os.path.isfile(text):
        raise ValueError(f"must be an existing checkpoint or 'auto', got {text!r} (no such file)")
    return text


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise ValueError(f"no such file: {text!r}")
    return text


# Built once, shared by every flag with the same rule.
_TYPES = {name: _argument_type(bound.parse, bound.kind.__name__) for name, bound in FIELD_BOUNDS.items()}
_TYPES.update(data=_argument_type(_data_path, "path"), resume=_argument_type(_resume_path, "path"),
              eval_bin=_argument_type(_existing_file, "path"), device=_argument_type(parse_device, "device"))


def _field_help() -> dict:
    """Each field's trailing comment in TrainConfig's source: one place documents a setting."""
    import inspect
    import re
    try:
        source = inspect.getsource(TrainConfig)
    except (OSError, TypeError):
        return {}
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^\s{4}(\w+):[^#\n]*#(.*)$", source, re.M)}


# The config's choices, and the DCQ loss backends (which DCQLoss checks).
_CHOICES = {**CHOICES, "backend": ("auto", "triton", "chunked", "reference")}


def build_parser() -> argparse.ArgumentParser:
    """The ``dcq-train`` parser: a flag per TrainConfig field, its default and help from the field."""
    parser = argparse.ArgumentParser(prog="dcq-train", description=trainer_module.__doc__.split("\n\n")[0],
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
            parser.add_argument(flag, type=_TYPES.get(f.name, str), nargs="*", **kwargs)
        elif f.name in _TYPES:
            parser.add_argument(flag, type=_TYPES[f.name], choices=_CHOICES.get(f.name), **kwargs)
        elif f.name == "output":
            parser.add_argument(flag, type=str, **kwargs)
        else:
            parser.add_argument(flag, type=type(default), choices=_CHOICES.get(f.name), **kwargs)
    return parser


def run(argv: Sequence[str] | None = None) -> dict:
    """``dcq-train`` in-process: parse, train, write OUTPUT/result.json; returns the
    result of :meth:`Trainer.fit`. A setting that cannot run exits as a usage error
    (SystemExit 2, the message naming the flag); a run stopped by too many bad steps
    raises TrainingError, one whose processes lost contact (a process stopped, hung or
    died: ``--dist-timeout``) CommunicationError. Under torchrun every rank leaves the
    process group together where it can (:func:`~dcq_ops.training.runtime.end_process`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = TrainConfig(**vars(args))
    except ValueError as exc:  # the checks that involve several settings (they name the flags)
        parser.error(str(exc))
    meet = False  # whether every rank stops at this point too (then they meet before leaving)
    try:
        try:
            trainer = Trainer(config)
            result = trainer.fit()  # every rank meets after the final checkpoint
        except ConfigError as exc:  # settings found wrong once the data, the device or the checkpoint is known
            meet = True  # found alike on every rank: the data, the checkpoint and the settings are theirs too
            parser.error(str(exc))
        except TrainingError:
            meet = True  # every rank reads the same bad-step count at the same step
            raise
        except RuntimeError as exc:
            if dist.is_available() and dist.is_initialized() and is_communication_error(exc):
                raise CommunicationError(
                    f"the processes lost contact: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc} "
                    f"(another process stopped, hung or died; a collective waits at most --dist-timeout "
                    f"{config.dist_timeout:g} s: raise it if rank 0's verification or checkpoint writes take longer)"
                ) from exc
            raise
        if trainer.rank == 0 and config.output:
            # final_eval: the feature extractor's verification; final_eval_generator: the
            # weight generator's (with --eval-model generator or both).
            summary = {"config": dataclasses.asdict(config), "steps": result["steps"],
                       "eval_model": config.eval_model, "final_eval": result["final_eval"],
                       "bad_steps": result["bad_steps"], "skipped_steps": result["skipped_steps"]}
            if "final_eval_generator" in result:
                summary["final_eval_generator"] = result["final_eval_generator"]
            with atomic_write(os.path.join(config.output, "result.json"), "w") as f:  # replaced whole
                json.dump({**summary, "elapsed_s": result["elapsed_s"]}, f, indent=2)
    finally:
        end_process(meet)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """The ``dcq-train`` console script: 0 when the run finished, 1 when it stopped
    (too many bad steps, no readable checkpoint, processes that lost contact), 2 for a
    bad argument (argparse)."""
    status = 0
    try:
        run(argv)
    except (TrainingError, CommunicationError) as exc:
        print(f"dcq-train: error: {exc}", file=sys.stderr)
        status = 1
    except SystemExit as exc:  # argparse's exit 2 (a setting found wrong), under torchrun too
        if not ended_multi_rank():
            raise
        status = exc.code if isinstance(exc.code, int) else 2
    if ended_multi_rank():
        exit_now(status)  # not through the interpreter's shutdown (runtime.exit_now says why)
    return status
