"""``python -m dcq_ops.eval``: verification accuracy of a backbone on insightface
``.bin`` sets (LFW, CFP-FP, AgeDB-30, ...), as arcface_torch reports it.

The backbone is read from either

- a checkpoint written by ``dcq_ops.train`` (its config names the backbone), or
- a plain state dict of an IResNet in arcface_torch's layout: arcface_torch's
  ``backbone.pth`` / ``model.pt`` (insightface's released r18..r200 weights
  included), or ``state_dict_backbone`` of its ``checkpoint_gpu_*.pt``. The
  depth is inferred from the blocks per layer, the embedding size from
  ``features.weight``, the input size from the FC; ``--network r50`` and
  ``--embedding-size`` name them where the keys do not tell.

    python -m dcq_ops.eval --checkpoint backbone.pth --bin lfw.bin --bin cfp_fp.bin

Bad arguments (a missing file, a state dict that names no known network and no
``--network``, a network that does not match the weights, weights that are not
finite, a ``.bin`` that is no insightface set or holds fewer than 10 pairs, a
device that is not here) exit with status 2 and a message naming the problem,
before any set is evaluated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import sys
from typing import Sequence

import torch
from torch import nn

from dcq_ops.training.backbones import BACKBONES, IRESNET_DEPTHS, IResNet, build_backbone, infer_iresnet
from dcq_ops.training.checkpoint import CHECKPOINT_FORMAT
from dcq_ops.training.config import TrainConfig
from dcq_ops.validation import positive_int_argument

# arcface_torch's names of its IResNets (``get_model("r50")``).
NETWORKS = {f"r{depth}": depth for depth in sorted(IRESNET_DEPTHS)}
ARCFACE_IMAGE_SIZE = 112  # arcface_torch's input, when the FC's shape does not tell


class CheckpointError(ValueError):
    """A checkpoint that cannot be turned into a backbone: the message says why
    and which argument would help."""


def _read(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # The safe unpickler refuses what dcq_ops.train checkpoints hold besides
        # tensors (RNG states with numpy arrays); read them as
        # checkpoint.load_backbone does. A checkpoint is trusted input either way.
        pass
    except Exception as exc:  # a zip that is not torch's, a truncated file, ...
        raise CheckpointError(f"{path}: cannot be read by torch.load: {type(exc).__name__}: {exc}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read by torch.load (not a checkpoint or a state dict?): "
                              f"{type(exc).__name__}: {exc}") from exc


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _without_module_prefix(state: dict) -> dict:
    # A state dict saved from a DistributedDataParallel wrapper (``module.conv1.weight``).
    if all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _mismatch(model: nn.Module, state: dict) -> str:
    """A short account of why ``state`` does not load into ``model`` (torch's
    message lists every key, hundreds for an IResNet)."""
    expected = model.state_dict()

    def some(keys):
        keys = sorted(keys)
        return ", ".join(keys[:3]) + (f", ... ({len(keys)} in all)" if len(keys) > 3 else "")

    parts = []
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    shapes = [k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing:
        parts.append(f"missing keys {some(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {some(unexpected)}")
    for key in sorted(shapes)[:3]:
        parts.append(f"{key} has shape {tuple(state[key].shape)}, the model {tuple(expected[key].shape)}")
    return "; ".join(parts)


def _from_train_checkpoint(path: str, state: dict, network: str | None, embedding_size: int | None):
    # The fields the backbone needs, with TrainConfig's defaults for those an
    # older checkpoint lacks. Not TrainConfig(**config): that checks the whole
    # run's settings (data paths, ...), which need not exist where one evaluates.
    config = {f.name: f.default for f in dataclasses.fields(TrainConfig)
              if f.default is not dataclasses.MISSING}
    config.update(state.get("config") or {})
    backbone = config["backbone"]
    if network is not None and backbone != f"iresnet{NETWORKS[network]}":
        raise CheckpointError(f"{path}: a dcq_ops.train checkpoint of backbone {backbone!r} (its config), "
                              f"but --network {network} names iresnet{NETWORKS[network]}")
    if embedding_size is not None and embedding_size != config["embedding_size"]:
        raise CheckpointError(f"{path}: a dcq_ops.train checkpoint of embedding size {config['embedding_size']} "
                              f"(its config), but --embedding-size says {embedding_size}")
    weights = state["backbone"]
    if not _is_state_dict(weights):
        raise CheckpointError(f"{path}: a dcq_ops.train checkpoint whose 'backbone' is not a state dict (names -> "
                              f"tensors), got {type(weights).__name__}")
    if backbone not in BACKBONES:
        raise CheckpointError(f"{path}: a dcq_ops.train checkpoint of backbone {backbone!r} (its config), which is "
                              f"none of {BACKBONES}")
    convs = [v for v in weights.values() if v.dim() == 4]
    if not convs:
        raise CheckpointError(f"{path}: the checkpoint's backbone has no convolution weights: not a {backbone}")
    try:
        model = build_backbone(backbone, in_channels=convs[0].shape[1], embedding_size=config["embedding_size"],
                               image_size=config["image_size"], width=config["width"], dropout=config["dropout"])
    except (ValueError, TypeError) as exc:  # a config this version cannot build
        raise CheckpointError(f"{path}: cannot build the checkpoint's backbone {backbone!r} from its config: "
                              f"{exc}") from exc
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the checkpoint's backbone does not load into {backbone!r} (as its config "
                              f"describes it): {_mismatch(model, weights)}") from exc
    return model, {"kind": "dcq_ops.train checkpoint", "network": backbone,
                   "embedding_size": config["embedding_size"], "image_size": config["image_size"]}


def _from_state_dict(path: str, state: dict, network: str | None, embedding_size: int | None):
    inferred = infer_iresnet(state)
    if network is not None:
        depth = NETWORKS[network]
        if inferred["depth"] is not None and inferred["depth"] != depth:
            raise CheckpointError(f"{path}: its keys have {inferred['blocks']} blocks per layer "
                                  f"(r{inferred['depth']}), but --network {network} has {IRESNET_DEPTHS[depth]}")
    elif inferred["depth"] is not None:
        depth = inferred["depth"]
    else:
        seen = (f"blocks per layer {inferred['blocks']}, which is no IResNet depth"
                if inferred["blocks"] else "no layer1..layer4 keys (e.g. layer1.0.conv1.weight)")
        example = ", ".join(list(state)[:3])
        raise CheckpointError(f"{path}: cannot infer the network from the state dict's keys ({seen}; first keys: "
                              f"{example}): pass --network {'|'.join(NETWORKS)}")
    if embedding_size is None:
        embedding_size = inferred["embedding_size"]
        if embedding_size is None:
            raise CheckpointError(f"{path}: cannot infer the embedding size (no features.weight or fc.weight): "
                                  f"pass --embedding-size")
    elif inferred["embedding_size"] is not None and inferred["embedding_size"] != embedding_size:
        raise CheckpointError(f"{path}: its features.weight has embedding size {inferred['embedding_size']}, "
                              f"but --embedding-size says {embedding_size}")
    image_size = inferred["image_size"] or ARCFACE_IMAGE_SIZE
    model = IResNet(depth, in_channels=inferred["in_channels"] or 3, embedding_size=embedding_size,
                    image_size=image_size)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the state dict does not load into IResNet-{depth} (r{depth}, embedding "
                              f"{embedding_size}, {image_size}x{image_size}): {_mismatch(model, state)}") from exc
    return model, {"kind": "state dict", "network": f"iresnet{depth}", "embedding_size": embedding_size,
                   "image_size": image_size}


def load_model(path: str | os.PathLike, network: str | None = None,
               embedding_size: int | None = None) -> tuple[nn.Module, dict]:
    """(backbone in eval mode on the CPU, {"kind", "network", "embedding_size",
    "image_size"}) of a dcq_ops.train checkpoint or a plain IResNet state dict
    (see the module's docs). ``network``: "r18" .. "r200", needed only when the
    keys do not tell. Raises :class:`CheckpointError` (a ValueError) naming the
    file and what is wrong."""
    path = os.fspath(path)
    if network is not None and network not in NETWORKS:
        raise CheckpointError(f"network must be one of {sorted(NETWORKS, key=NETWORKS.get)}, got {network!r}")
    state = _read(path)
    if isinstance(state, nn.Module):  # torch.save(model): its weights
        state = state.state_dict()
    if isinstance(state, dict) and "format" in state and "backbone" in state:
        if state["format"] != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{path}: a dcq_ops.train checkpoint of format {state['format']!r}, this "
                                  f"version reads format {CHECKPOINT_FORMAT}")
        model, info = _from_train_checkpoint(path, state, network, embedding_size)
    else:
        if isinstance(state, dict) and _is_state_dict(state.get("state_dict_backbone")):
            state = state["state_dict_backbone"]  # arcface_torch's checkpoint_gpu_<rank>.pt
        if not _is_state_dict(state):
            what = f"a dict with keys {list(state)[:6]}" if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(f"{path}: expected a dcq_ops.train checkpoint or a state dict (names -> tensors) "
                                  f"of an arcface_torch IResNet, got {what}")
        model, info = _from_state_dict(path, _without_module_prefix(state), network, embedding_size)
    _check_finite(path, model)
    return model.eval(), info


def _check_finite(path: str, model: nn.Module) -> None:
    """CheckpointError naming the tensors of ``model`` that hold NaN or inf: such a
    network's embeddings are not finite, and its verification would fail on them."""
    bad = [name for name, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        shown = ", ".join(bad[:3]) + (f", ... ({len(bad)} in all)" if len(bad) > 3 else "")
        raise CheckpointError(f"{path}: the weights hold NaN or infinite values ({shown}): nothing to evaluate")


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dcq_ops.eval",
        description="Verification accuracy on insightface .bin sets of a dcq_ops.train checkpoint or an "
                    "arcface_torch backbone.pth (a plain IResNet state dict)")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint written by dcq_ops.train, or an IResNet state dict in arcface_torch's "
                             "layout (backbone.pth)")
    parser.add_argument("--bin", action="append", required=True, help="an insightface .bin (repeatable)")
    parser.add_argument("--network", choices=tuple(NETWORKS),
                        help="arcface_torch's name of the IResNet, when the state dict's keys do not tell")
    parser.add_argument("--embedding-size", type=positive_int_argument,
                        help="the embedding size, when the state dict does not tell")
    parser.add_argument("--batch-size", type=positive_int_argument, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (a GPU that is there)")
    return parser


def evaluate(argv: Sequence[str] | None = None) -> dict:
    """Run the command line; returns {set name: evaluate_bin's result} (the
    name is the .bin's file name, or the path as given when two share a name). Bad
    arguments exit with status 2 (argparse's error), before any set is evaluated: a
    missing or unreadable file, a .bin that is no insightface set or holds fewer than
    10 pairs, a set given twice, a checkpoint that builds no network or holds NaN or
    infinite weights, a device that is not here."""
    from dcq_ops.training.periodic_eval import bin_set_names, load_eval_bin
    from dcq_ops.training.runtime import resolve_device
    from dcq_ops.training.verification import evaluate_bin
    parser = build_parser()
    args = parser.parse_args(argv)
    # Every file is checked before the model is built or a set decoded.
    if not os.path.isfile(args.checkpoint):
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    for path in args.bin:
        if not os.path.isfile(path):
            parser.error(f"--bin {path}: no such file")
    try:
        names = bin_set_names(args.bin)
    except ValueError as exc:
        parser.error(f"--bin {exc}")
    try:
        device = resolve_device(args.device)  # cpu, cuda or cuda:N, and that GPU exists
    except ValueError as exc:
        parser.error(f"--device {args.device}: {str(exc).removeprefix(f'--device {args.device}: ')}")
    try:
        model, info = load_model(args.checkpoint, args.network, args.embedding_size)
    except CheckpointError as exc:
        parser.error(str(exc))
    # Every set is read and checked before the first is evaluated: a bad one is a usage error, not a late failure.
    sets = {}
    for name, path in zip(names, args.bin):
        try:
            sets[name] = load_eval_bin(path, info["image_size"])
        except ValueError as exc:  # not a .bin, too few pairs, an image that does not decode: the message names the file
            parser.error(f"--bin {exc}")
    model = model.to(device)
    print(f"{args.checkpoint}: {info['kind']}, {info['network']}, embedding {info['embedding_size']}, "
          f"input {info['image_size']}x{info['image_size']}", flush=True)
    results = {}
    for name, data in sets.items():
        results[name] = evaluate_bin(model, data, args.batch_size, device=device)
        print(f"{name}: " + json.dumps(results[name]), flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """The command line (``sys.exit(main())`` exits 0): :func:`evaluate` without the return value."""
    evaluate(argv)


if __name__ == "__main__":
    sys.exit(main())
