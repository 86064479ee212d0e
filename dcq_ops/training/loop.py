"""The thin training loop behind ``python -m dcq_ops.train`` (or ``dcq-train``).

Backbone (small CNN by default, IResNet-18/34/50/100/200), head by flag (``dcq``,
``softmax``, ``partial_fc``), SGD or AdamW, linear warm-up then cosine or step
decay (per step), AMP (fp16 with a GradScaler, or bf16), gradient clipping,
progress lines (or a tqdm bar when tqdm is installed and the output is a
terminal) with loss and samples/s, periodic verification (of the feature
extractor, of DCQ's weight generator, or both: ``--eval-model``), a CSV or
JSON-lines log and checkpoints that resume exactly.

The default data set is the synthetic long-tailed identity set
(:mod:`dcq_ops.training.synthetic`), so the defaults train on a CPU in a few minutes;
``--data DIR`` trains on an image folder (one folder per identity) or on
insightface's RecordIO (``--data PATH``: a ``.rec``, or a folder holding
``train.rec`` and ``train.idx``; :mod:`dcq_ops.training.recordio`), and
``--eval-bin lfw.bin`` evaluates on insightface's sets.

Exact resume: a checkpoint holds the backbone, the head (the DCQ queue or the
FC weights), the weight generator, the optimizer, the scheduler, the grad
scaler, the step and the RNG states. The data order and augmentation are pure
functions of (seed, epoch, index) (:mod:`dcq_ops.training.data`), so a run resumed at
step s replays exactly what an uninterrupted run does after step s.

Several processes: under ``torchrun --nproc_per_node=W`` (WORLD_SIZE > 1) the
loop initialises a process group (gloo on CPU, NCCL on GPU), wraps the
backbone (and a head with parameters) in DistributedDataParallel, shards every
epoch across ranks, DCQLoss shares one queue across ranks (its
``distributed="auto"`` mode, see dcq_ops/parallel/), and the weight
generator runs with MoCo's shuffle-BN.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dcq_ops.margin import MarginConfig
from dcq_ops.momentum import MomentumEncoder
from dcq_ops.parallel import shuffled_forward
from dcq_ops.training.backbones import BACKBONES, build_backbone
from dcq_ops.training.data import ImageFolder, TwoViewBatchSampler, TwoViewDataset, batch_loader
from dcq_ops.training.heads import HEADS, build_head
from dcq_ops.training.synthetic import SyntheticConfig, make_synthetic
from dcq_ops.training.verification import DEFAULT_FARS, embed, evaluate_bin, load_bin, verification_report

CHECKPOINT_FORMAT = 1
MOMENTUM_SCHEDULES = ("constant", "cosine")
QUEUE_WARMUPS = ("empty", "random", "prefill")
EVAL_MODELS = ("backbone", "generator", "both")


@dataclass
class TrainConfig:
    """Every setting of a run. Each field is also a command-line flag
    (``--field-name``); see ``python -m dcq_ops.train --help``."""

    # Head
    head: str = "dcq"                    # dcq | softmax | partial_fc
    sample_rate: float = 0.1             # DCQ queue = ceil(sample_rate * classes); Partial FC sample rate
    queue_size: int | None = None        # DCQ: overrides sample_rate
    # Generator momentum and queue warm-up defaults: chosen by `benchmarks/accuracy.py --calibrate` (see
    # benchmarks/ACCURACY.md; 0.999 and a cosine rise did not beat a constant 0.99 in 4644-step runs).
    momentum: float = 0.99               # weight generator EMA momentum (the start value under momentum_schedule=cosine)
    momentum_schedule: str = "constant"  # constant | cosine: rise from momentum to momentum_end over the run (BYOL)
    momentum_end: float = 0.999          # the generator momentum at the last step under momentum_schedule=cosine
    generator_bn: str = "train"          # weight generator BatchNorm: train (batch stats, as MoCo) | eval (running stats)
    queue_warmup: str = "empty"          # DCQ queue at step 0: empty (only filled slots are negatives) | random (unit vectors, as the official code) | prefill (generator embeddings of training images)
    margin: str = "cosface"              # cosface | arcface
    scale: float = 32.0
    margin_value: float = 0.3            # CosFace m (m3) or ArcFace m (m2)
    backend: str = "auto"                # DCQ loss backend
    # Backbone
    backbone: str = "small_cnn"          # small_cnn | iresnet18/34/50/100/200 (arcface_torch's layout)
    width: int = 16                      # small_cnn channels
    embedding_size: int = 128
    dropout: float = 0.0
    # Data
    data: str = "synthetic"              # synthetic | an image folder (a sub-folder per identity) | a .rec or its folder
    image_size: int = 32                 # synthetic resolution / image-folder resize
    synthetic_identities: int = 2000
    synthetic_eval_identities: int = 400
    synthetic_seed: int = 0
    synthetic_median_images: float = 4.0  # long tail: median training images per synthetic identity
    synthetic_max_images: int = 80        # the most training images of one synthetic identity
    augment: bool = True                 # random flip + shift on both views
    num_workers: int = 0
    eval_bin: list = field(default_factory=list)  # insightface .bin sets evaluated with flip TTA
    # Optimisation
    optimizer: str = "sgd"               # sgd | adamw
    lr: float = 0.1
    weight_decay: float = 5e-4
    sgd_momentum: float = 0.9
    batch_size: int = 128
    epochs: float = 4.0
    steps: int | None = None             # overrides epochs
    warmup_epochs: float = 1.0
    schedule: str = "cosine"             # cosine | step
    decay_at: list = field(default_factory=lambda: [0.6, 0.85])  # step schedule: fractions of the run
    decay_gamma: float = 0.1
    amp: str = "none"                    # none | fp16 | bf16
    clip_grad: float = 5.0               # max grad norm of the backbone; 0 = off
    seed: int = 0
    deterministic: bool = False          # torch.use_deterministic_algorithms
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    threads: int = 0                     # torch CPU threads; 0 = torch's default
    # Output
    output: str | None = None            # directory of the log and checkpoints
    log_format: str = "csv"              # csv | json (JSON lines)
    log_every: int = 20
    progress: str = "auto"               # auto | bar | lines | none
    eval_every: int = 0                  # steps between verifications; 0 = at the end only
    eval_pairs: int = 6000
    eval_model: str = "backbone"         # backbone | generator (the EMA weight generator, DCQ's encoder_k) | both
    save_every: int = 0                  # steps between checkpoints; 0 = at the end only
    keep_checkpoints: int = 2            # step checkpoints kept (checkpoint.pt, the latest, is always kept)
    resume: str | None = None            # a checkpoint, or "auto" (OUTPUT/checkpoint.pt if it exists)
    stop_after: int | None = None        # stop after this step, as if interrupted (the schedule is unchanged)

    def __post_init__(self):
        choices = {"head": tuple(HEADS), "margin": ("cosface", "arcface"), "optimizer": ("sgd", "adamw"),
                   "schedule": ("cosine", "step"), "amp": ("none", "fp16", "bf16"), "log_format": ("csv", "json"),
                   "progress": ("auto", "bar", "lines", "none"), "generator_bn": ("eval", "train"),
                   "backbone": BACKBONES, "momentum_schedule": MOMENTUM_SCHEDULES, "queue_warmup": QUEUE_WARMUPS,
                   "eval_model": EVAL_MODELS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("batch_size", "embedding_size", "width", "image_size", "synthetic_identities",
                     "synthetic_eval_identities", "synthetic_max_images", "log_every", "eval_pairs",
                     "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("eval_every", "save_every", "num_workers", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0):
            raise ValueError(f"steps must be a positive int or None, got {self.steps!r}")
        if self.steps is None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
        if not 0 <= self.momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum!r}")
        if not 0 <= self.momentum_end <= 1:
            raise ValueError(f"momentum_end must be in [0, 1], got {self.momentum_end!r}")
        if self.eval_model != "backbone" and HEADS[self.head].needs_class_weights is False:
            raise ValueError(f"eval_model={self.eval_model!r} needs a weight generator, which only the DCQ head has "
                             f"(head={self.head!r}): use eval_model='backbone'")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.warmup_epochs < 0 or self.weight_decay < 0 or self.clip_grad < 0:
            raise ValueError(f"warmup_epochs, weight_decay and clip_grad must be >= 0, got "
                             f"{self.warmup_epochs!r}, {self.weight_decay!r}, {self.clip_grad!r}")
        if any(not 0 < f < 1 for f in self.decay_at):
            raise ValueError(f"decay_at must be fractions of the run in (0, 1), got {self.decay_at!r}")

    def margin_config(self) -> MarginConfig:
        if self.margin == "cosface":
            return MarginConfig(self.scale, 1.0, 0.0, self.margin_value)
        # ArcFace with the exact margin derivative (arcface_torch's straight-through
        # variant is available through dcq_ops.MarginConfig(straight_through=True)).
        return MarginConfig(self.scale, 1.0, self.margin_value, 0.0)


# Fields that change what a run computes: a resumed run must agree on them.
_RESUME_NEUTRAL = {"output", "log_format", "log_every", "progress", "eval_every", "eval_pairs", "eval_model", "save_every",
                   "keep_checkpoints", "resume", "stop_after", "num_workers", "eval_bin", "threads", "device"}


# --------------------------------------------------------------------------- distributed


def setup_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); initialises the default process group when launched
    by torchrun with WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


# --------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=2)
def _synthetic(identities: int, eval_identities: int, image_size: int, seed: int, median_images: float = 4.0,
               max_images: int = 80):
    # Cached: benchmarks train several heads on the same set in one process.
    return make_synthetic(SyntheticConfig(num_identities=identities, num_eval_identities=eval_identities,
                                          probe_identities=eval_identities, image_size=image_size, seed=seed,
                                          median_images=median_images, max_images=max_images))


def build_data(config: TrainConfig):
    """(two-view training dataset, number of classes, input channels, verification sets
    {name: (images, labels)})."""
    if config.data == "synthetic":
        data = _synthetic(config.synthetic_identities, config.synthetic_eval_identities, config.image_size,
                          config.synthetic_seed, config.synthetic_median_images, config.synthetic_max_images)
        dataset = TwoViewDataset(data.train_images, data.train_labels, seed=config.seed,
                                 augment="default" if config.augment else None)
        return dataset, data.num_classes, data.train_images.shape[1], data.verification_sets()
    # Imported here: `python -m dcq_ops.training.recordio` must find that module not yet imported.
    from dcq_ops.training.recordio import RecordIOImages, is_recordio
    if is_recordio(config.data):  # insightface's train.rec + train.idx (a .rec, or a folder holding them)
        source = RecordIOImages(config.data, image_size=config.image_size)
        num_classes = source.num_classes
    else:
        source = ImageFolder(config.data, image_size=config.image_size)
        num_classes = len(source.classes)
    dataset = TwoViewDataset(source, seed=config.seed, augment="default" if config.augment else None)
    return dataset, num_classes, 3, {}


# --------------------------------------------------------------------------- schedule


def lr_factor(step: int, total: int, warmup: int, schedule: str, decay_at: Sequence[float], gamma: float) -> float:
    """The learning-rate multiplier of ``step`` (0-based): linear warm-up over
    ``warmup`` steps, then cosine to 0 at ``total``, or x ``gamma`` at each
    fraction of ``decay_at``."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return gamma ** sum(step >= round(f * total) for f in decay_at)


def generator_momentum(step: int, total: int, start: float, end: float, schedule: str) -> float:
    """The weight generator's EMA momentum for the update after ``step`` (0-based)
    of ``total``: ``start`` throughout ("constant"), or a cosine rise from
    ``start`` at step 0 to ``end`` at the last step ("cosine"), as BYOL raises its
    target momentum: m_t = end - (end - start) * (cos(pi t / (T - 1)) + 1) / 2.

    Why a rise: the EMA's time constant is 1 / (1 - m) steps. Early in training
    the feature extractor moves fast and a generator with m = 0.999 (1000 steps)
    still produces the class weights of an almost random network, so the loss
    has little to pull towards; late in training a long average gives stabler
    class weights."""
    if schedule == "constant":
        return start
    if schedule != "cosine":
        raise ValueError(f"schedule must be one of {MOMENTUM_SCHEDULES}, got {schedule!r}")
    progress = min(1.0, step / max(1, total - 1))
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


# --------------------------------------------------------------------------- logging


LOG_COLUMNS = ("kind", "step", "epoch", "loss", "lr", "samples_per_s", "grad_norm", "model", "set", "accuracy",
               "accuracy_std", *(f"tar@far={f:g}" for f in DEFAULT_FARS), "xnorm", "elapsed_s")


class RunLog:
    """Appends records to OUTPUT/log.csv (fixed columns, blanks where a record has
    no value) or OUTPUT/log.jsonl (every key); keeps them in ``records``."""

    def __init__(self, output: str | None, fmt: str, enabled: bool = True):
        self.records: list[dict] = []
        self.path = None
        if output and enabled:
            os.makedirs(output, exist_ok=True)
            self.path = os.path.join(output, "log.csv" if fmt == "csv" else "log.jsonl")
        self.fmt = fmt

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is None:
            return
        if self.fmt == "json":
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            return
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(record)


class Progress:
    """Periodic plain lines, or a tqdm bar when asked (or "auto" on a terminal with tqdm installed)."""

    def __init__(self, mode: str, total: int, initial: int, enabled: bool):
        self.bar = None
        self.enabled = enabled and mode != "none"
        if self.enabled and mode in ("auto", "bar"):
            try:
                from tqdm import tqdm
            except ImportError:
                if mode == "bar":
                    print("progress=bar needs tqdm (`pip install tqdm`); printing lines instead", file=sys.stderr)
            else:
                if mode == "bar" or sys.stdout.isatty():
                    self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True)

    def update(self, record: dict, steps: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(steps)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}",
                                 samples_s=f"{record['samples_per_s']:.0f}")
        else:
            print(f"step {record['step']}/{total} epoch {record['epoch']:.2f} loss {record['loss']:.4f} "
                  f"lr {record['lr']:.4g} {record['samples_per_s']:.0f} samples/s", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- the trainer


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    """Everything of one run; :meth:`fit` trains, :meth:`evaluate` verifies,
    :meth:`state_dict` / :meth:`load_state_dict` checkpoint."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.device = _resolve_device(config.device)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.rank, self.world_size = setup_distributed(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        # One seed for the model initialisation (the same on every rank: DDP
        # broadcasts rank 0's anyway, and every head starts from the same backbone).
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)

        self.dataset, self.num_classes, channels, self.verification_sets = build_data(config)
        self.sampler = TwoViewBatchSampler(len(self.dataset), config.batch_size, seed=config.seed,
                                           rank=self.rank, world_size=self.world_size)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = config.steps or max(1, math.ceil(config.epochs * self.steps_per_epoch))
        self.warmup_steps = min(self.total_steps, round(config.warmup_epochs * self.steps_per_epoch))

        self.backbone = build_backbone(config.backbone, in_channels=channels, embedding_size=config.embedding_size,
                                       image_size=config.image_size, width=config.width,
                                       dropout=config.dropout).to(self.device)
        head_kwargs = {}
        if config.head == "dcq":
            head_kwargs = dict(queue_size=config.queue_size, backend=config.backend, validate=False)
        self.head = build_head(config.head, self.num_classes, config.embedding_size, config.margin_config(),
                               config.sample_rate, **head_kwargs).to(self.device)
        if config.head == "dcq":
            queue = self.head.loss.queue
            slots = getattr(queue, "global_size", queue.size)
            if slots < config.batch_size * self.world_size:
                raise ValueError(f"the DCQ queue ({slots} slots = sample_rate {config.sample_rate} x "
                                 f"{self.num_classes} classes, or queue_size) must hold one global batch "
                                 f"(batch_size {config.batch_size} x {self.world_size} processes): "
                                 f"raise queue_size or sample_rate, or lower batch_size")
        self.generator = None
        if getattr(self.head, "needs_class_weights", False):
            self.generator = MomentumEncoder(self.backbone, config.momentum).to(self.device)
            self._generator_mode()

        params = [p for p in list(self.backbone.parameters()) + list(self.head.parameters()) if p.requires_grad]
        if config.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=config.lr, momentum=config.sgd_momentum,
                                             weight_decay=config.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            lr_factor, total=self.total_steps, warmup=self.warmup_steps, schedule=config.schedule,
            decay_at=tuple(config.decay_at), gamma=config.decay_gamma))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")

        # Several ranks: DDP on the backbone (and on a head with parameters).
        self.model = self.backbone
        self.head_module = self.head
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.backbone, device_ids=ids)
            if any(p.requires_grad for p in self.head.parameters()):
                self.head_module = nn.parallel.DistributedDataParallel(self.head, device_ids=ids)
        # Different ranks draw different random numbers (dropout, Partial FC sampling).
        torch.manual_seed(config.seed + self.rank)
        self.step = 0
        self.log = RunLog(config.output, config.log_format, enabled=self.rank == 0)
        self._loaded_bins = None

    def _generator_mode(self) -> None:
        # "train" (default): the generator's BatchNorm normalises with the
        # statistics of its own batch, as MoCo's key encoder does. "eval" uses the
        # running statistics copied from the feature extractor; early in training
        # they lag the weights, every class weight then carries the same offset,
        # and the loss loses its signal (measured on the synthetic set: the loss
        # climbs to its chance level and verification stays near that of the
        # random initialisation). Under several ranks "train" uses shuffle-BN.
        self.generator.train(self.config.generator_bn == "train")

    def _class_weights(self, images: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1 and self.config.generator_bn == "train":
            return shuffled_forward(self.generator, images)
        return self.generator(images)

    # ----------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict:
        rng = _rng_state()
        if self.world_size > 1:  # every rank's generators, so each rank resumes its own stream
            states = [None] * self.world_size
            dist.all_gather_object(states, rng)
            rng = states
        return {
            "format": CHECKPOINT_FORMAT,
            "config": dataclasses.asdict(self.config),
            "step": self.step,
            "world_size": self.world_size,
            "backbone": self.backbone.state_dict(),
            "head": self.head.state_dict(),
            "generator": None if self.generator is None else self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint format must be {CHECKPOINT_FORMAT}, got {state.get('format')!r}")
        # A field the checkpoint's version did not have yet ran at its default.
        saved = {**dataclasses.asdict(TrainConfig()), **state["config"]}
        mine = dataclasses.asdict(self.config)
        differ = {k: (saved.get(k), v) for k, v in mine.items() if k not in _RESUME_NEUTRAL and saved.get(k) != v}
        if differ:
            details = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
            raise ValueError(f"the checkpoint was written with different settings, which would not resume the "
                             f"same run: {details}")
        if state["world_size"] != self.world_size:
            raise ValueError(f"the checkpoint was written by {state['world_size']} processes, this run has "
                             f"{self.world_size}: the data order and the RNG streams differ")
        self.backbone.load_state_dict(state["backbone"])
        self.head.load_state_dict(state["head"])
        if self.generator is not None:
            self.generator.load_state_dict(state["generator"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        _set_rng_state(rng[self.rank] if isinstance(rng, list) else rng)
        self.step = int(state["step"])

    def save(self, final: bool = False) -> str | None:
        """Write OUTPUT/checkpoint_<step>.pt and OUTPUT/checkpoint.pt (the latest); rank 0 only."""
        state = self.state_dict()  # a collective under several ranks: every rank calls it
        if self.rank != 0 or not self.config.output:
            return None
        out = self.config.output
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"checkpoint_{self.step:07d}.pt")
        tmp = path + ".tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)  # never a half-written checkpoint under the final name
        latest = os.path.join(out, "checkpoint.pt")
        try:
            os.link(path, latest + ".tmp")
        except OSError:
            torch.save(state, latest + ".tmp")
        os.replace(latest + ".tmp", latest)
        steps = sorted(f for f in os.listdir(out) if f.startswith("checkpoint_") and f.endswith(".pt"))
        for old in steps[:-self.config.keep_checkpoints]:
            os.remove(os.path.join(out, old))
        return path

    def resume(self, path: str) -> None:
        if path == "auto":
            path = os.path.join(self.config.output or "", "checkpoint.pt")
            if not self.config.output or not os.path.exists(path):
                return  # nothing to resume: a fresh run
        if not os.path.exists(path):
            raise ValueError(f"resume must be an existing checkpoint or 'auto', got {path!r} (no such file)")
        self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))

    # ----------------------------------------------------------------- training

    def _autocast(self):
        if self.config.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.config.amp == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimisation step; returns (loss, backbone grad norm or None), on the device."""
        images_a, images_b, labels = (t.to(self.device, non_blocking=True) for t in batch)
        self.model.train()
        self.head.train()
        with self._autocast():
            embeddings = self.model(images_a)
            class_weights = self._class_weights(images_b) if self.generator is not None else None
        # The head in fp32: the margin softmax is where precision matters (and
        # the DCQ kernels accumulate in fp32 anyway).
        loss = self.head_module(embeddings.float(), labels,
                                None if class_weights is None else class_weights.float())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        grad_norm = None
        if self.config.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.backbone.parameters(), self.config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.generator is not None:
            self._update_generator()
        self.step += 1
        return loss.detach(), grad_norm

    def _update_generator(self) -> None:
        """g <- mu g + (1 - mu) f after f moved, mu from the momentum schedule."""
        c = self.config
        self.generator.momentum = generator_momentum(self.step, self.total_steps, c.momentum, c.momentum_end,
                                                     c.momentum_schedule)
        # generator_bn="eval": the generator normalises with the feature extractor's
        # running statistics, which update() copies. "train": it keeps its own, from
        # its own forward passes, as the official code's encoder_k does; they do not
        # affect training (train mode normalises with batch statistics) but are what
        # the generator is evaluated with, and the feature extractor's belong to
        # other weights.
        self.generator.update(self.backbone, copy_buffers=c.generator_bn == "eval")

    @torch.no_grad()
    def warm_queue(self) -> None:
        """Fill the DCQ queue before the first step, as ``queue_warmup`` says:
        "empty" leaves it (until it has been filled, K / B steps, only the filled
        slots are negatives, so the loss starts against fewer negatives);
        "random" fills it with random unit vectors under a label no class has
        (the official code initialises its queue so: every slot is a negative
        from the first step); "prefill" fills it with the weight generator's
        embeddings of random training images, under their labels.

        Every rank computes the same keys (same images, same generator), so a
        queue that every rank holds in full stays the same on all of them."""
        mode = self.config.queue_warmup
        if mode == "empty" or self.config.head != "dcq":
            return
        queue = self.head.loss.queue
        if getattr(self.head.loss, "distributed", "none") == "sharded" or not hasattr(queue, "enqueue"):
            raise ValueError(f"queue_warmup={mode!r} needs a queue held in full on every rank, not a sharded one")
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + 17)  # not the training streams
        size, batch = queue.size, self.config.batch_size
        if mode == "random":
            keys = torch.randn(size, queue.dim, generator=g).to(self.device)
            labels = torch.full((size,), self.num_classes, dtype=torch.long, device=self.device)
            queue.enqueue(keys, labels)
            return
        # Whole batches (BatchNorm in train mode needs more than one image), then the
        # last `size` keys; the generator runs without shuffle-BN so that every rank
        # gets the same keys.
        batches = -(-size // batch)
        order = torch.cat([torch.randperm(len(self.dataset), generator=g)
                           for _ in range(-(-batches * batch // len(self.dataset)))])
        keys, labels = [], []
        for b in range(batches):
            indices = order[b * batch:(b + 1) * batch].numpy()
            _, images, batch_labels = self.dataset.get_batch(indices, epoch=0)
            with self._autocast():
                keys.append(self.generator(images.to(self.device)).float())
            labels.append(batch_labels.to(self.device))
        queue.enqueue(torch.cat(keys)[-size:], torch.cat(labels)[-size:])

    def eval_models(self) -> tuple[str, ...]:
        """The models ``eval_model`` names: "backbone" (the feature extractor) and/or
        "generator" (the weight generator, which the official DCQ code evaluates)."""
        return ("backbone", "generator") if self.config.eval_model == "both" else (self.config.eval_model,)

    @torch.no_grad()
    def evaluate(self, model: str = "backbone") -> dict:
        """Verification of the feature extractor (``model="backbone"``) or of the
        weight generator (``"generator"``; with generator_bn=train it normalises
        with its own running statistics), on rank 0 ({} elsewhere): every
        synthetic set (10-fold accuracy, TAR@FAR; flip TTA) and every --eval-bin."""
        if model not in ("backbone", "generator"):
            raise ValueError(f"model must be 'backbone' or 'generator', got {model!r}")
        if model == "generator" and self.generator is None:
            raise ValueError(f"head {self.config.head!r} has no weight generator to evaluate")
        if self.rank != 0:
            return {}
        network = self.backbone if model == "backbone" else self.generator.module
        results = {}
        for name, (images, labels) in self.verification_sets.items():
            embeddings = embed(network, images, batch_size=512, flip=True, device=self.device)
            results[name] = verification_report(embeddings, labels, self.config.eval_pairs, seed=self.config.seed)
        if self.config.eval_bin:
            if self._loaded_bins is None:
                size = (self.config.image_size, self.config.image_size)
                self._loaded_bins = {os.path.basename(p): load_bin(p, size) for p in self.config.eval_bin}
            for name, data in self._loaded_bins.items():
                results[name] = evaluate_bin(network, data, batch_size=256, device=self.device)
        return results

    def _evaluate_and_log(self, progress: Progress, start: float) -> dict:
        """{model: {set: report}} for every model of ``eval_model``, logged."""
        results = {model: self.evaluate(model) for model in self.eval_models()}
        for model, sets in results.items():
            self._log_eval(sets, progress, start, model)
        return results

    def _log_eval(self, results: dict, progress: Progress, start: float, model: str = "backbone") -> None:
        for name, r in results.items():
            self.log.write({"kind": "eval", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                            "model": model, "set": name, "elapsed_s": time.perf_counter() - start, **r})
            # "*": fewer impostor pairs than 1/FAR, so the threshold is the highest impostor score.
            tars = " ".join(f"{k.replace('tar@far=', 'TAR@')} {v:.4f}{'*' if r.get(k + '_unresolved') else ''}"
                            for k, v in r.items() if k.startswith("tar@") and not k.endswith("_unresolved"))
            which = "" if model == "backbone" else f" [{model}]"
            progress.message(f"eval step {self.step} {name}{which}: accuracy {r['accuracy']:.4f} "
                             f"+- {r.get('accuracy_std', 0):.4f} {tars}")

    def fit(self) -> dict:
        """Train to the end (or ``stop_after``); returns {"steps", "final_eval" (the
        backbone's, {} unless eval_model evaluates it), "final_eval_generator" (the
        weight generator's, when eval_model evaluates it), "history", "elapsed_s"}."""
        config = self.config
        if config.resume:
            self.resume(config.resume)
        stop = self.total_steps if config.stop_after is None else min(self.total_steps, config.stop_after)
        progress = Progress(config.progress, self.total_steps, self.step, enabled=self.rank == 0)
        start = window_start = time.perf_counter()
        if self.step == 0:
            self.warm_queue()  # a fresh run (a resumed one restored its queue); timed with the first steps
        loss_sum, window_steps, last = None, 0, {}
        samples_per_step = config.batch_size * self.world_size
        try:
            while self.step < stop:
                epoch, first_batch = divmod(self.step, self.steps_per_epoch)
                for batch in batch_loader(self.dataset, self.sampler, epoch, first_batch, config.num_workers):
                    loss, grad_norm = self.train_step(batch)
                    # Accumulated on the device: read once per log line, not per step.
                    loss_sum = loss if loss_sum is None else loss_sum + loss
                    window_steps += 1
                    if self.step % config.log_every == 0 or self.step == stop:
                        now = time.perf_counter()
                        last = {"kind": "train", "step": self.step, "epoch": self.step / self.steps_per_epoch,
                                "loss": float(loss_sum) / window_steps,
                                "lr": self.optimizer.param_groups[0]["lr"],
                                "samples_per_s": window_steps * samples_per_step / max(now - window_start, 1e-9),
                                "grad_norm": None if grad_norm is None else float(grad_norm),
                                "elapsed_s": now - start}
                        self.log.write(last)
                        progress.update(last, window_steps, self.total_steps)
                        loss_sum, window_steps, window_start = None, 0, time.perf_counter()
                    if config.eval_every and self.step % config.eval_every == 0 and self.step < self.total_steps:
                        self._evaluate_and_log(progress, start)
                        window_start = time.perf_counter()  # keep evaluation out of samples/s
                    if config.save_every and self.step % config.save_every == 0 and self.step < stop:
                        self.save()
                    if self.step >= stop:
                        break
            self.save(final=True)
            finals = self._evaluate_and_log(progress, start) if self.step >= self.total_steps else {}
        finally:
            progress.close()
        result = {"steps": self.step, "total_steps": self.total_steps, "final_eval": finals.get("backbone", {}),
                  "history": [r for r in self.log.records if r["kind"] == "train"],
                  "last": last, "elapsed_s": time.perf_counter() - start}
        if "generator" in self.eval_models():
            result["final_eval_generator"] = finals.get("generator", {})
        return result


def train(config: TrainConfig | None = None, **overrides) -> dict:
    """Build a :class:`Trainer` and fit it; returns its result dict with the
    trainer under "trainer"."""
    if config is None:
        config = TrainConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    trainer = Trainer(config)
    result = trainer.fit()
    result["trainer"] = trainer
    return result


def load_backbone(path: str, map_location="cpu") -> nn.Module:
    """The feature extractor of a checkpoint written by this loop, in eval mode."""
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not a dcq_ops.train checkpoint (format {CHECKPOINT_FORMAT})")
    c = TrainConfig(**state["config"])
    channels = next(v for k, v in state["backbone"].items() if v.dim() == 4).shape[1]  # the first conv's input
    model = build_backbone(c.backbone, in_channels=channels, embedding_size=c.embedding_size,
                           image_size=c.image_size, width=c.width, dropout=c.dropout)
    model.load_state_dict(state["backbone"])
    return model.eval()
