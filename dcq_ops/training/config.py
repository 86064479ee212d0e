"""The settings of a run: :class:`TrainConfig` (every field is also a ``dcq-train``
flag), the table of numeric bounds that checks it and parses the command line
(``FIELD_BOUNDS``, so both say the same), the choices of the string settings, and
:class:`ConfigError`, the error of settings that cannot run."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch

from dcq_ops.margin import MarginConfig
from dcq_ops.training.backbones import BACKBONES
from dcq_ops.training.heads import HEADS
from dcq_ops.validation import check_choice, check_int

MOMENTUM_SCHEDULES = ("constant", "cosine")
QUEUE_WARMUPS = ("empty", "random", "prefill")
EVAL_MODELS = ("backbone", "generator", "both")
VALIDATE_MODES = ("async", "eager", "off")
QUEUE_MODES = ("auto", "gathered", "sharded")


class ConfigError(ValueError):
    """Settings that cannot run (the command line turns it into a usage error, status 2).

    Parameters
    ----------
    message : str
        What is wrong, naming the flags.
    """


@dataclass(frozen=True)
class Bound:
    """The values one numeric setting takes: an int, or a finite float, in a range
    (either end open or absent). One table of them (FIELD_BOUNDS) checks a
    TrainConfig and parses the command line, so both say the same."""

    kind: type                 # int | float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        """The rule in words ("a positive int", "in (0, 1]", ...), as the messages say it.

        Returns
        -------
        str
        """
        if self.kind is int:
            if self.high is not None:
                return f"an int in [{self.low}, {self.high}]"
            return "a positive int" if self.low == 1 else f"an int >= {self.low}"
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"a finite number {'>' if self.low_open else '>='} {self.low:g}"
        return "a finite number"

    def check(self, name: str, value) -> None:
        """Raise ValueError "NAME must be <the rule>, got VALUE" unless ``value`` keeps the rule.

        Parameters
        ----------
        name : str
            The setting's name, for the message.
        value : object
            What was given (a bool is neither an int nor a number here).
        """
        if self.kind is int:
            # The library's int check (a bool is no int), worded with this bound's rule.
            check_int(name, value, minimum=self.low, expected=self.describe())
            if self.high is None or value <= self.high:
                return
        elif (not isinstance(value, bool) and isinstance(value, numbers.Real)
              and math.isfinite(value)  # NaN passes no comparison below
              and not (self.low is not None and (value <= self.low if self.low_open else value < self.low))
              and not (self.high is not None and (value >= self.high if self.high_open else value > self.high))):
            return
        raise ValueError(f"{name} must be {self.describe()}, got {value!r}")

    def parse(self, text: str):
        """The value of a command-line string.

        Parameters
        ----------
        text : str
            The flag's argument.

        Returns
        -------
        int or float
            ``text`` as this bound's kind; ValueError with the rule when it is not one or
            breaks the rule.
        """
        try:
            value = int(text) if self.kind is int else float(text)
            self.check("value", value)
        except ValueError:
            raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        return value


_POSITIVE = Bound(int, 1)
_COUNT = Bound(int, 0)
_UNIT = Bound(float, 0.0, 1.0)
_SEED = Bound(int, 0, 2**32 - 1)  # numpy's seeds are 32-bit
# The optimizers take the learning rate and the weight decay as float32 (a fused kernel's
# scalar argument): a larger value is no float32 and ends the first step with an error.
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# torch.set_num_threads(100000) crashes the process (the OpenMP pool cannot be made):
# more threads than any CPU has cores are refused instead.
MAX_THREADS = 4096
# Lengths in epochs: a run's steps are round(epochs x steps per epoch), which must be an int.
_EPOCHS = Bound(float, 0.0, 1e9, low_open=True)
FIELD_BOUNDS = {
    "sample_rate": Bound(float, 0.0, 1.0, low_open=True), "queue_size": _POSITIVE, "momentum": _UNIT,
    "momentum_end": _UNIT, "scale": Bound(float, 0.0, low_open=True), "margin_value": Bound(float, 0.0),
    "width": _POSITIVE, "embedding_size": _POSITIVE, "dropout": Bound(float, 0.0, 1.0, high_open=True),
    "image_size": _POSITIVE, "synthetic_identities": _POSITIVE,
    # A verification set needs two identities (impostor pairs) and 10 pairs (the 10 folds).
    "synthetic_eval_identities": Bound(int, 2), "synthetic_seed": _SEED,
    "synthetic_median_images": Bound(float, 0.0, low_open=True), "synthetic_max_images": _POSITIVE,
    "num_workers": _COUNT, "lr": Bound(float, 0.0, _FLOAT32_MAX, low_open=True),
    "weight_decay": Bound(float, 0.0, _FLOAT32_MAX), "sgd_momentum": Bound(float, 0.0, 1.0, high_open=True),
    "batch_size": _POSITIVE, "epochs": _EPOCHS, "steps": _POSITIVE,
    "warmup_epochs": Bound(float, 0.0, 1e9), "decay_at": Bound(float, 0.0, 1.0, low_open=True, high_open=True),
    "decay_gamma": Bound(float, 0.0, 1.0, low_open=True), "clip_grad": Bound(float, 0.0), "max_bad_steps": _COUNT,
    "seed": _SEED, "threads": Bound(int, 0, MAX_THREADS), "log_every": _POSITIVE, "eval_every": _COUNT,
    "eval_pairs": Bound(int, 10), "save_every": _COUNT, "keep_checkpoints": _POSITIVE, "stop_after": _POSITIVE,
    # timedelta takes up to 1e9 days; a day is already longer than any collective should wait.
    "dist_timeout": Bound(float, 0.0, 86400.0, low_open=True),
}
# Settings that may be None (their default): "not set".
_OPTIONAL = {"queue_size", "steps", "stop_after"}
# The values of each string setting: TrainConfig checks them, the command line offers them.
CHOICES = {"head": tuple(HEADS), "margin": ("cosface", "arcface"), "optimizer": ("sgd", "adamw"),
           "schedule": ("cosine", "step"), "amp": ("none", "fp16", "bf16"), "log_format": ("csv", "json"),
           "progress": ("auto", "bar", "lines", "none"), "generator_bn": ("train", "eval"), "backbone": BACKBONES,
           "momentum_schedule": MOMENTUM_SCHEDULES, "queue_warmup": QUEUE_WARMUPS, "eval_model": EVAL_MODELS,
           "validate": VALIDATE_MODES, "queue_mode": QUEUE_MODES}
# The smallest image each backbone takes whole: its stride-2 stages must divide it.
_IMAGE_MULTIPLE = {"small_cnn": 4}


def parse_device(name: str) -> str:
    """Check a ``--device`` value; whether that GPU exists is checked when the run starts.

    Parameters
    ----------
    name : str
        "auto", "cpu", "cuda" or "cuda:N".

    Returns
    -------
    str
        ``name``; ValueError when it is no device dcq-train runs on.
    """
    if name == "auto":
        return name
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {name!r}")
    return name


@dataclass
class TrainConfig:
    """Every setting of a run. Each field is also a command-line flag
    (``--field-name``); see ``python -m dcq_ops.train --help``, whose help for each
    field is its comment below. Every field is checked when the config is made
    (ValueError naming the setting, and the flags where several settings are involved).

    Attributes
    ----------
    head : str
        "dcq", "softmax" or "partial_fc"; its settings: ``sample_rate``, ``queue_size``,
        DCQ's levers (``momentum``, ``momentum_schedule``, ``momentum_end``,
        ``generator_bn``, ``queue_warmup``), ``margin``, ``scale``, ``margin_value``,
        ``backend``, ``queue_mode``.
    backbone : str
        "small_cnn" or "iresnet18/34/50/100/200"; its settings: ``width``,
        ``embedding_size``, ``dropout``.
    data : str
        "synthetic" (shaped by the ``synthetic_*`` fields), an image folder or a RecordIO
        set; with ``image_size``, ``augment``, ``num_workers``, ``eval_bin``.
    optimizer : str
        "sgd" or "adamw"; with ``lr``, ``weight_decay``, ``sgd_momentum``, ``batch_size``,
        the run's length (``epochs`` or ``steps``), its schedule (``warmup_epochs``,
        ``schedule``, ``decay_at``, ``decay_gamma``), ``amp``, ``clip_grad``, the bad-step
        guard (``validate``, ``max_bad_steps``), ``seed``, ``deterministic``, ``device``,
        ``threads``, ``dist_timeout``.
    output : str or None
        The directory of the log and the checkpoints; with ``log_format``, ``log_every``,
        ``progress``, verification (``eval_every``, ``eval_pairs``, ``eval_model``),
        checkpoints (``save_every``, ``keep_checkpoints``), ``resume``, ``stop_after``.
    """

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
    queue_mode: str = "auto"             # DCQ queue under several processes: auto (= gathered) | gathered (every rank holds the whole queue, the paper's) | sharded (one global queue split across the ranks); a checkpoint resumes in either mode and on any number of processes
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
    validate: str = "async"              # async | eager | off: skip the update of a step with NaN/inf in its loss, gradients or head inputs (and DCQ keeps a bad batch out of its queue). async: decided on the device, no host sync; eager: read at once (one host sync per step); off: nothing is checked, a bad step reaches the weights (see docs/training.md)
    max_bad_steps: int = 10              # stop with an error after more bad (skipped) steps than this; 0 = at the first
    seed: int = 0
    deterministic: bool = False          # torch.use_deterministic_algorithms
    device: str = "auto"                 # auto | cpu | cuda | cuda:N
    threads: int = 0                     # torch CPU threads (at most 4096); 0 = torch's default
    dist_timeout: float = 300.0          # seconds a process waits for the others in a collective before it stops with an error (under torchrun); it must cover rank 0's verification (--eval-every, the final one) and checkpoint writes, which the other ranks wait for
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
        for name, allowed in CHOICES.items():
            check_choice(name, getattr(self, name), allowed)
        for name, bound in FIELD_BOUNDS.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            for item in value if isinstance(value, list) else [value]:
                bound.check(name, item)
        try:
            parse_device(self.device)
        except ValueError as exc:
            raise ValueError(f"device {exc}") from None
        # Checks that involve several settings name the flags: the command line shows them as they are.
        if self.head == "dcq" and self.queue_size is not None and self.queue_size < self.batch_size:
            raise ValueError(f"queue_size (--queue-size {self.queue_size}) is smaller than batch_size (--batch-size "
                             f"{self.batch_size}): the DCQ queue must hold one global batch: raise --queue-size or "
                             f"lower --batch-size")
        if self.batch_size < 2:
            raise ValueError(f"batch_size (--batch-size) must be >= 2, got {self.batch_size}: every backbone "
                             f"({self.backbone}) has BatchNorm layers, which normalise with the statistics of the "
                             f"batch in training and need at least 2 samples")
        multiple = _IMAGE_MULTIPLE.get(self.backbone, 16)  # IResNet: four stride-2 stages
        if self.image_size % multiple:
            raise ValueError(f"image_size (--image-size) must be a multiple of {multiple} for backbone "
                             f"{self.backbone!r} (its stride-2 stages), got {self.image_size}")
        if self.eval_model != "backbone" and HEADS[self.head].needs_class_weights is False:
            raise ValueError(f"eval_model={self.eval_model!r} needs a weight generator, which only the DCQ head has "
                             f"(head={self.head!r}): use eval_model='backbone'")

    def margin_config(self) -> MarginConfig:
        """The head's margin: CosFace (m3 = margin_value) or ArcFace (m2 = margin_value).

        Returns
        -------
        MarginConfig
        """
        if self.margin == "cosface":
            return MarginConfig(self.scale, 1.0, 0.0, self.margin_value)
        # ArcFace with the exact margin derivative (arcface_torch's straight-through
        # variant is available through dcq_ops.MarginConfig(straight_through_margin=True)).
        return MarginConfig(self.scale, 1.0, self.margin_value, 0.0)


# Fields that change what a run computes: a resumed run must agree on them.
RESUME_NEUTRAL = {"output", "log_format", "log_every", "progress", "eval_every", "eval_pairs", "eval_model", "save_every",
                   "keep_checkpoints", "resume", "stop_after", "num_workers", "eval_bin", "threads", "device",
                   "validate", "max_bad_steps", "queue_mode", "dist_timeout"}


