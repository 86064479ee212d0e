"""A synthetic long-tailed identity set: the embedded default data set.

Face-recognition training sets are long-tailed: in MegaFace2 (672K identities,
4.7M photos) most identities have fewer than 10 images and a few have hundreds.
DCQ's claim is about that tail, so the default data set reproduces it in
miniature, small enough to train on a CPU in minutes:

- each identity is a latent vector ``z`` (``latent_dim``);
- an image of it is rendered from ``z`` plus a per-image jitter of ``z``
  (expression/age-like), a face-like template, then a random similarity
  transform with a horizontal squeeze (pose-like), a gain, tint and linear
  illumination ramp (lighting-like) and pixel noise;
- the number of training images per identity is drawn from a discretised
  log-normal clipped to ``[min_images, max_images]`` (median ``median_images``);
  identities with at most ``tail_max_images`` training images are the *tail*;
- disjoint held-out identities give open-set verification pairs (as LFW does),
  and fresh renders of training identities give probes of the tail and the
  head (identities seen in training, new images).

The templates are left-right symmetric, so a horizontal flip is a
label-preserving augmentation and flip test-time augmentation is meaningful,
as for faces.

Everything is deterministic from ``seed``: each part (latents, counts, images
of each split) has its own generator, so changing the size of one split does
not change the others.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from dcq_ops.validation import check_int, check_positive_int

# Independent random streams of one seed, one per part of the data set.
_STREAMS = {"basis": 1, "train_latents": 2, "counts": 3, "train_images": 4,
            "eval_latents": 5, "eval_images": 6, "probe_select": 7, "probe_images": 8}


def _generator(seed: int, stream: str) -> torch.Generator:
    # A fixed odd multiplier spreads (seed, stream) over the 63-bit seed space.
    return torch.Generator().manual_seed((seed * 1_000_003 + _STREAMS[stream] * 7919) % (2**63 - 1))


@dataclass
class SyntheticConfig:
    """Settings of :func:`make_synthetic` (all sizes are per data set, not per batch).

    Attributes
    ----------
    num_identities, num_eval_identities : int
        Training identities (the classes), and disjoint held-out identities.
    eval_images_per_identity, probe_identities, probe_images_per_identity : int
        The verification sets: held-out images per identity, and the training identities
        re-rendered for the tail and head probes.
    median_images, tail_spread, min_images, max_images : float or int
        The long tail of training images per identity (log-normal, clipped).
    tail_max_images, head_min_images : int
        Which identities count as "tail" and "head".
    channels, image_size, latent_dim, basis_resolution : int
        The images' shape and the identity latent.
    identity_strength, expression, rotation_deg, scale_jitter, shift, squeeze, gain, tint, ramp, bias, noise : float
        The rendering: identity contrast, per-image jitter, pose, lighting and noise.
    seed : int
        Everything is a function of it.
    """

    num_identities: int = 2000           # training identities (classes)
    num_eval_identities: int = 400       # disjoint held-out identities
    eval_images_per_identity: int = 4
    probe_identities: int = 400          # training identities re-rendered for the tail/head probes (each)
    probe_images_per_identity: int = 4
    median_images: float = 4.0           # long tail: median training images per identity
    tail_spread: float = 1.0             # log-normal sigma of the image counts
    min_images: int = 1
    max_images: int = 80
    tail_max_images: int = 3             # identities with <= this many training images are "tail"
    head_min_images: int = 12            # ... and with >= this many are "head" (for the head probe)
    channels: int = 3
    image_size: int = 32
    latent_dim: int = 32
    basis_resolution: int = 6            # the identity basis is smooth: drawn at this size, upsampled
    identity_strength: float = 0.55      # contrast of the identity pattern relative to the template
    expression: float = 0.45             # per-image jitter of the latent (fraction of its spread)
    rotation_deg: float = 10.0
    scale_jitter: float = 0.08
    shift: float = 0.06                  # translation, fraction of the half-width
    squeeze: float = 0.10                # horizontal squeeze (yaw-like), log-normal sigma
    gain: float = 0.25                   # lighting gain, log-normal sigma
    tint: float = 0.08                   # per-channel gain, log-normal sigma (colour only)
    ramp: float = 0.35                   # amplitude of the linear illumination ramp
    bias: float = 0.15
    noise: float = 0.10
    seed: int = 0

    def __post_init__(self):
        for name in ("num_identities", "num_eval_identities", "channels", "image_size", "latent_dim",
                     "basis_resolution", "min_images", "max_images"):
            value = getattr(self, name)
            check_positive_int(f"SyntheticConfig.{name}", value)
        for name in ("eval_images_per_identity", "probe_images_per_identity"):
            value = getattr(self, name)
            check_int(f"SyntheticConfig.{name}", value, minimum=2, expected="an int >= 2 (verification needs pairs)")
        if self.probe_identities < 0:
            raise ValueError(f"SyntheticConfig.probe_identities must be >= 0, got {self.probe_identities!r}")
        if self.min_images > self.max_images:
            raise ValueError(f"SyntheticConfig.min_images ({self.min_images}) must be <= max_images ({self.max_images})")
        if self.median_images <= 0:
            raise ValueError(f"SyntheticConfig.median_images must be > 0, got {self.median_images!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"SyntheticConfig.channels must be 1 or 3, got {self.channels!r}")


@dataclass
class SyntheticFaces:
    """The rendered data set. Images are float32 [N, C, S, S], roughly in [-1, 1]
    (the range arcface_torch feeds its backbones)."""

    config: SyntheticConfig
    train_images: torch.Tensor
    train_labels: torch.Tensor           # [N] in [0, num_identities)
    counts: torch.Tensor                 # [num_identities] training images per identity
    is_tail: torch.Tensor                # [num_identities] bool: counts <= tail_max_images
    eval_images: torch.Tensor            # held-out identities (disjoint from training)
    eval_labels: torch.Tensor            # [M] in [0, num_eval_identities)
    probes: dict = field(default_factory=dict)  # name -> (images, labels): fresh renders of training identities

    @property
    def num_classes(self) -> int:
        return self.config.num_identities

    def verification_sets(self) -> dict:
        """name -> (images, labels) of every verification set: "heldout" (disjoint
        identities: the overall score), then the probes ("tail", "head")."""
        sets = {"heldout": (self.eval_images, self.eval_labels)}
        sets.update(self.probes)
        return sets

    def summary(self) -> dict:
        counts = self.counts.float()
        return {
            "identities": self.config.num_identities,
            "train_images": int(self.train_labels.numel()),
            "images_per_identity": {
                "mean": round(float(counts.mean()), 3), "median": float(counts.median()),
                "max": int(counts.max()), "min": int(counts.min()),
                "fraction_under_10": round(float((counts < 10).float().mean()), 4),
                "singletons": int((self.counts == 1).sum()),
            },
            "tail_identities": int(self.is_tail.sum()),
            "tail_fraction_of_images": round(float(self.counts[self.is_tail].sum() / self.counts.sum()), 4),
            "heldout_identities": self.config.num_eval_identities,
            "probe_sets": {k: int(v[1].unique().numel()) for k, v in self.probes.items()},
            "image_shape": list(self.train_images.shape[1:]),
        }


def image_counts(config: SyntheticConfig) -> torch.Tensor:
    """Training images per identity: a discretised log-normal (median
    ``median_images``, sigma ``tail_spread``) clipped to [min_images, max_images]."""
    g = _generator(config.seed, "counts")
    log_counts = math.log(config.median_images) + config.tail_spread * torch.randn(config.num_identities, generator=g)
    return log_counts.exp().round().clamp(config.min_images, config.max_images).long()


def _basis(config: SyntheticConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(template [C, S, S], identity basis [L, C, S, S]), both left-right symmetric."""
    g = _generator(config.seed, "basis")
    S, C, R = config.image_size, config.channels, config.basis_resolution
    coarse = torch.randn(config.latent_dim, C, R, R, generator=g)
    basis = F.interpolate(coarse, size=(S, S), mode="bicubic", align_corners=False)
    basis = 0.5 * (basis + basis.flip(-1))  # symmetric: a flip keeps the identity
    basis = basis / basis.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    basis = basis / math.sqrt(config.latent_dim)  # sum over latents has unit spread
    # A face-like template: a bright oval with darker eyes and mouth, so that
    # pose transforms move recognisable structure.
    y, x = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")
    oval = torch.sigmoid((1 - (x / 0.72) ** 2 - (y / 0.9) ** 2) * 8)
    eyes = torch.exp(-(((x.abs() - 0.32) / 0.13) ** 2 + ((y + 0.22) / 0.09) ** 2))
    mouth = torch.exp(-((x / 0.28) ** 2 + ((y - 0.45) / 0.07) ** 2))
    template = (1.6 * oval - 0.8 - 0.9 * eyes * oval - 0.6 * mouth * oval).expand(C, S, S).clone()
    if C == 3:
        template = template * torch.tensor([1.0, 0.85, 0.7]).view(3, 1, 1)  # skin-like colour balance
    return template, basis


def render(latents: torch.Tensor, config: SyntheticConfig, generator: torch.Generator,
           chunk: int = 4096) -> torch.Tensor:
    """Images [N, C, S, S] of the identities ``latents`` [N, L] (one image per row),
    with nuisance drawn from ``generator``. All random draws are made up front, so
    the result does not depend on ``chunk``."""
    N, L = latents.shape
    if L != config.latent_dim:
        raise ValueError(f"latents must be [N, {config.latent_dim}] (latent_dim), got {tuple(latents.shape)}")
    S, C = config.image_size, config.channels
    template, basis = _basis(config)
    g = generator
    jitter = torch.randn(N, L, generator=g)
    angle = torch.randn(N, generator=g) * math.radians(config.rotation_deg)
    scale = (torch.randn(N, generator=g) * config.scale_jitter).exp()
    squeeze = (torch.randn(N, generator=g) * config.squeeze).exp()
    shift = torch.randn(N, 2, generator=g) * config.shift
    gain = (torch.randn(N, generator=g) * config.gain).exp()
    tint = (torch.randn(N, C, generator=g) * (config.tint if C == 3 else 0.0)).exp()
    ramp = torch.randn(N, generator=g) * config.ramp
    ramp_dir = torch.rand(N, generator=g) * (2 * math.pi)
    bias = torch.randn(N, generator=g) * config.bias
    noise = torch.randn(N, C, S, S, generator=g) * config.noise

    y, x = torch.meshgrid(torch.linspace(-1, 1, S), torch.linspace(-1, 1, S), indexing="ij")
    out = torch.empty(N, C, S, S)
    flat_basis = basis.reshape(L, -1)
    for lo in range(0, N, chunk):
        hi = min(N, lo + chunk)
        z = latents[lo:hi] + config.expression * jitter[lo:hi]
        face = template + config.identity_strength * (z @ flat_basis).view(-1, C, S, S)
        # Pose: the sampling grid is the inverse map (rotation, scale, squeeze, shift).
        cos, sin = angle[lo:hi].cos(), angle[lo:hi].sin()
        sx, sy = 1.0 / (scale[lo:hi] * squeeze[lo:hi]), 1.0 / scale[lo:hi]
        theta = torch.stack([
            torch.stack([cos * sx, -sin * sx, shift[lo:hi, 0]], dim=1),
            torch.stack([sin * sy, cos * sy, shift[lo:hi, 1]], dim=1),
        ], dim=1)
        grid = F.affine_grid(theta, [hi - lo, C, S, S], align_corners=False)
        face = F.grid_sample(face, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # Lighting: gain and tint, a linear ramp in a random direction, a bias.
        direction = ramp_dir[lo:hi]
        light = 1 + ramp[lo:hi].view(-1, 1, 1) * (x * direction.cos().view(-1, 1, 1) + y * direction.sin().view(-1, 1, 1))
        face = face * (gain[lo:hi].view(-1, 1, 1, 1) * tint[lo:hi].view(-1, C, 1, 1)) * light.unsqueeze(1)
        face = face + bias[lo:hi].view(-1, 1, 1, 1) + noise[lo:hi]
        out[lo:hi] = torch.tanh(face)  # bounded like normalised pixels
    return out


def make_synthetic(config: SyntheticConfig | None = None, **overrides) -> SyntheticFaces:
    """Render the synthetic long-tailed identity set (deterministic from ``config.seed``).

    Parameters
    ----------
    config : SyntheticConfig, optional
        The settings (default: SyntheticConfig()).
    **overrides
        Fields of SyntheticConfig that replace those of ``config``.

    Returns
    -------
    SyntheticFaces
        The training images and labels, the held-out and probe verification sets.
    """
    if config is None:
        config = SyntheticConfig(**overrides)
    elif overrides:
        config = SyntheticConfig(**{**asdict(config), **overrides})
    if not isinstance(config, SyntheticConfig):
        raise TypeError(f"config must be a SyntheticConfig, got {type(config).__name__}")
    C, L = config.num_identities, config.latent_dim
    latents = torch.randn(C, L, generator=_generator(config.seed, "train_latents"))
    counts = image_counts(config)
    labels = torch.repeat_interleave(torch.arange(C), counts)
    train_images = render(latents[labels], config, _generator(config.seed, "train_images"))

    E, k = config.num_eval_identities, config.eval_images_per_identity
    eval_latents = torch.randn(E, L, generator=_generator(config.seed, "eval_latents"))
    eval_labels = torch.arange(E).repeat_interleave(k)
    eval_images = render(eval_latents[eval_labels], config, _generator(config.seed, "eval_images"))

    is_tail = counts <= config.tail_max_images
    probes = {}
    if config.probe_identities > 0:
        g_select = _generator(config.seed, "probe_select")
        g_images = _generator(config.seed, "probe_images")
        groups = (("tail", is_tail), ("head", counts >= config.head_min_images))
        for name, mask in groups:
            ids = mask.nonzero().view(-1)
            ids = ids[torch.randperm(ids.numel(), generator=g_select)[: config.probe_identities]].sort().values
            if ids.numel() < 2:
                continue  # too few identities in the group for verification pairs
            probe_labels = ids.repeat_interleave(config.probe_images_per_identity)
            probes[name] = (render(latents[probe_labels], config, g_images), probe_labels)
    return SyntheticFaces(config, train_images, labels, counts, is_tail, eval_images, eval_labels, probes)


@functools.lru_cache(maxsize=2)
def load_synthetic(identities: int, eval_identities: int, image_size: int, seed: int, median_images: float = 4.0,
                   max_images: int = 80) -> SyntheticFaces:
    """The synthetic set of dcq-train's ``--synthetic-*`` settings, rendered once per
    process (cached: benchmarks train several heads on the same set in one process).

    Parameters
    ----------
    identities, eval_identities : int
        Training identities, and held-out identities for verification (also the number
        of head and tail probe identities).
    image_size : int
        The side of the square images.
    seed : int
        Everything is a function of it.
    median_images : float
        The median number of training images of an identity (the long tail).
    max_images : int
        The most training images of one identity.

    Returns
    -------
    SyntheticFaces
        Shared between calls with the same arguments: do not modify it in place.
    """
    return make_synthetic(SyntheticConfig(num_identities=identities, num_eval_identities=eval_identities,
                                          probe_identities=eval_identities, image_size=image_size, seed=seed,
                                          median_images=median_images, max_images=max_images))
