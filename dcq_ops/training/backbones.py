"""Backbones: a small CNN (the CPU default) and IResNet-18/34/50/100/200 (with
arcface_torch's state-dict layout, so checkpoints move both ways).

Both end the way arcface_torch's backbones do: BatchNorm over the last feature
map, dropout, flatten, a fully connected layer to the embedding, and a
BatchNorm1d whose scale is fixed at 1 (the embedding's norm is left to the
network; the heads normalise it).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from dcq_ops.validation import check_positive_int


class EmbeddingOutput(nn.Module):
    """BN2d -> dropout -> flatten -> FC -> BN1d (fixed unit scale): feature map to embedding."""

    def __init__(self, channels: int, spatial: int, embedding_size: int, dropout: float = 0.0):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=1e-5)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(channels * spatial * spatial, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        # A learned BN scale would only rescale the embedding, which the margin
        # heads normalise away; fixing it at 1 (as arcface_torch does) removes a
        # useless degree of freedom.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.bn(x)).flatten(1)
        return self.features(self.fc(x))


def _conv_bn_act(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.PReLU(cout))


class SmallCNN(nn.Module):
    """A small CNN for small images (the CPU default): three stages of
    conv-BN-PReLU at widths w, 2w, 4w, the last two opening with a stride-2 conv,
    so a 32x32 input ends as an 8x8 map.

    Parameters
    ----------
    in_channels : int
        Image channels (1 or 3).
    embedding_size : int
        The embedding's size.
    width : int
        Channels of the first stage (w).
    image_size : int
        The input's side, a multiple of 4.
    dropout : float
        Dropout before the FC (0: none).
    """

    def __init__(self, in_channels: int = 3, embedding_size: int = 128, width: int = 32, image_size: int = 32,
                 dropout: float = 0.0):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("embedding_size", embedding_size),
                            ("width", width), ("image_size", image_size)):
            check_positive_int(name, value)
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two stride-2 stages), got {image_size}")
        w = width
        self.body = nn.Sequential(
            _conv_bn_act(in_channels, w, 1),
            _conv_bn_act(w, 2 * w, 2),
            _conv_bn_act(2 * w, 2 * w, 1),
            _conv_bn_act(2 * w, 4 * w, 2),
            _conv_bn_act(4 * w, 4 * w, 1),
        )
        self.output = EmbeddingOutput(4 * w, image_size // 4, embedding_size, dropout)
        self.in_channels, self.image_size, self.embedding_size = in_channels, image_size, embedding_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.body(x))


class IBasicBlock(nn.Module):
    """The "improved" residual unit of ArcFace (Deng et al. 2019, Fig. 7):
    BN -> conv3x3 -> BN -> PReLU -> conv3x3 (carries the stride) -> BN, plus the
    shortcut (1x1 conv + BN where the shape changes). No activation after the sum.

    The submodules carry arcface_torch's names (bn1, conv1, bn2, prelu, conv2,
    bn3, downsample), so state dicts move between the two code bases unchanged.
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, eps=1e-5)
        self.prelu = nn.PReLU(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout, eps=1e-5)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (x if self.downsample is None else self.downsample(x))


IRESNET_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 200: (6, 26, 60, 6)}


class IResNet(nn.Module):
    """IResNet of ArcFace: a stride-1 3x3 stem at 64 channels, four stages of
    IBasicBlocks at 64/128/256/512 channels, each halving the resolution in its
    first block (112x112 -> 7x7), then BN2d -> flatten -> dropout -> FC -> BN1d
    (scale fixed at 1) to the embedding. ``image_size`` must be a multiple of 16.

    The state dict has arcface_torch's layout (``recognition/arcface_torch/
    backbones/iresnet.py``: conv1, bn1, prelu, layer1..layer4, bn2, fc,
    features), so arcface_torch's ``backbone.pth`` / ``model.pt`` (insightface's
    released r18..r200 weights included) load with ``load_state_dict``, and this
    model's weights load into arcface_torch's model (for its ``eval_ijbc.py``
    or ONNX export). At 112x112 with 3 channels and the default widths the
    shapes are equal too; other sizes change the FC's input (512 x (size/16)^2).
    Only the initialisation differs: PyTorch's defaults here, N(0, 0.1) for the
    convolutions there.

    State dicts of the earlier layout of this class (stem, stages, output) are
    renamed on load.

    Parameters
    ----------
    depth : int
        18, 34, 50, 100 or 200.
    in_channels : int
        Image channels.
    embedding_size : int
        The embedding's size.
    image_size : int
        The input's side, a multiple of 16.
    dropout : float
        Dropout before the FC (0: none).
    widths : tuple of int
        The four stages' channels.
    zero_init_residual : bool
        Start each block's last BatchNorm at zero (every block the identity).
    """

    def __init__(self, depth: int = 50, in_channels: int = 3, embedding_size: int = 512, image_size: int = 112,
                 dropout: float = 0.0, widths: tuple[int, int, int, int] = (64, 128, 256, 512),
                 zero_init_residual: bool = False):
        super().__init__()
        if depth not in IRESNET_DEPTHS:
            raise ValueError(f"depth must be one of {sorted(IRESNET_DEPTHS)}, got {depth!r}")
        for name, value in (("in_channels", in_channels), ("embedding_size", embedding_size),
                            ("image_size", image_size)):
            check_positive_int(name, value)
        if image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (four stride-2 stages), got {image_size}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        cin = widths[0]
        for stage, (blocks, cout) in enumerate(zip(IRESNET_DEPTHS[depth], widths), start=1):
            units = [IBasicBlock(cin, cout, 2)] + [IBasicBlock(cout, cout, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{stage}", nn.Sequential(*units))
            cin = cout
        self.bn2 = nn.BatchNorm2d(cin, eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(cin * (image_size // 16) ** 2, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        # A learned BN scale would only rescale the embedding, which the margin
        # heads normalise away; fixing it at 1 (as arcface_torch does) removes a
        # useless degree of freedom.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad_(False)
        if zero_init_residual:
            # Each block then starts as the identity, which helps very deep nets
            # early on: zero the scale of the block's last BN (bn3), whose output
            # is the residual branch.
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)
        self.depth, self.in_channels, self.image_size, self.embedding_size = depth, in_channels, image_size, embedding_size
        self._register_load_state_dict_pre_hook(_rename_legacy_iresnet_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x).flatten(1))
        return self.features(self.fc(x))


# The earlier layout of IResNet (stem / stages.S.B.residual.K / shortcut / output)
# -> arcface_torch's names, so checkpoints written before the rename still load.
_LEGACY_BLOCK = {"residual.0": "bn1", "residual.1": "conv1", "residual.2": "bn2", "residual.3": "prelu",
                 "residual.4": "conv2", "residual.5": "bn3", "shortcut.0": "downsample.0",
                 "shortcut.1": "downsample.1"}
_LEGACY_TOP = {"stem.0": "conv1", "stem.1": "bn1", "stem.2": "prelu", "output.bn": "bn2", "output.fc": "fc",
               "output.features": "features"}
_LEGACY_KEY = re.compile(r"stages\.(\d+)\.(\d+)\.(residual\.\d|shortcut\.\d)\.(.+)")


def _rename_legacy_iresnet_keys(state_dict, prefix, *args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        rest = key[len(prefix):]
        match = _LEGACY_KEY.fullmatch(rest)
        if match and match.group(3) in _LEGACY_BLOCK:
            new = f"layer{int(match.group(1)) + 1}.{match.group(2)}.{_LEGACY_BLOCK[match.group(3)]}.{match.group(4)}"
        else:
            head, _, tail = rest.rpartition(".")
            if head not in _LEGACY_TOP:
                continue
            new = f"{_LEGACY_TOP[head]}.{tail}"
        state_dict[prefix + new] = state_dict.pop(key)


BACKBONES = ("small_cnn", "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200")


def build_backbone(name: str, *, in_channels: int = 3, embedding_size: int = 512, image_size: int = 112,
                   width: int = 32, dropout: float = 0.0) -> nn.Module:
    """A backbone by name.

    Parameters
    ----------
    name : str
        "small_cnn" or "iresnet{18,34,50,100,200}".
    in_channels : int
        Image channels.
    embedding_size : int
        The embedding's size.
    image_size : int
        The input's side (a multiple of 4 for small_cnn, of 16 for an IResNet).
    width : int
        small_cnn's first-stage channels (ignored by an IResNet).
    dropout : float
        Dropout before the FC.

    Returns
    -------
    torch.nn.Module
        Images [N, C, S, S] -> embeddings [N, embedding_size].
    """
    if name == "small_cnn":
        return SmallCNN(in_channels, embedding_size, width, image_size, dropout)
    if name.startswith("iresnet") and name[len("iresnet"):].isdigit() and int(name[len("iresnet"):]) in IRESNET_DEPTHS:
        return IResNet(int(name[len("iresnet"):]), in_channels, embedding_size, image_size, dropout)
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")


_LAYER_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.")


def infer_iresnet(state_dict) -> dict:
    """What an IResNet state dict in arcface_torch's layout says about its
    network: {"depth", "blocks", "embedding_size", "image_size", "in_channels"}.
    ``depth`` comes from the blocks per layer (``layer{1..4}.{b}.*``, e.g.
    (3, 4, 14, 3) -> 50), ``embedding_size`` from ``features.weight`` (or
    ``fc.weight``), ``image_size`` from the FC's input (512 x (size/16)^2),
    ``in_channels`` from ``conv1.weight``. An entry is None where the keys do
    not tell (another layout, a depth not in IRESNET_DEPTHS, a missing tensor).
    Only names and shapes are read, so tensors on the meta device do."""
    counts = {}
    for key in state_dict:
        match = _LAYER_BLOCK.match(key)
        if match:
            layer, block = int(match.group(1)), int(match.group(2))
            counts[layer] = max(counts.get(layer, 0), block + 1)
    blocks = tuple(counts.get(layer, 0) for layer in (1, 2, 3, 4)) if counts else None
    depth = next((d for d, layout in IRESNET_DEPTHS.items() if layout == blocks), None)

    def shape(key):
        value = state_dict.get(key)
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    features, fc, conv1 = shape("features.weight"), shape("fc.weight"), shape("conv1.weight")
    embedding_size = features[0] if features and len(features) == 1 else (fc[0] if fc and len(fc) == 2 else None)
    image_size = None
    channels = shape("bn2.weight")
    if fc and len(fc) == 2 and channels and len(channels) == 1 and fc[1] % channels[0] == 0:
        side = round((fc[1] // channels[0]) ** 0.5)
        if side > 0 and side * side * channels[0] == fc[1]:
            image_size = 16 * side  # four stride-2 stages
    in_channels = conv1[1] if conv1 and len(conv1) == 4 else None
    return {"depth": depth, "blocks": blocks, "embedding_size": embedding_size, "image_size": image_size,
            "in_channels": in_channels}
