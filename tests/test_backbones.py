"""IResNet's state dict has arcface_torch's layout, so checkpoints move both ways.

tests/data/arcface_iresnet_keys.json was generated once from insightface's
recognition/arcface_torch/backbones/iresnet.py (the commit is named in the
file): the r50 state dict's names and shapes, and for r18..r200 the key count,
the parameter count and a digest of the sorted "name:shape" lines.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from dcq_ops.training.backbones import BACKBONES, IResNet, build_backbone

UPSTREAM = json.loads((Path(__file__).parent / "data" / "arcface_iresnet_keys.json").read_text())


def shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def test_r50_names_and_shapes_equal_arcface_torch():
    with torch.device("meta"):  # shapes only: no memory, no time
        mine = shapes(build_backbone("iresnet50"))
    assert list(mine) == list(UPSTREAM["iresnet50"])  # the same names in the same order
    assert mine == UPSTREAM["iresnet50"]


@pytest.mark.parametrize("depth", [18, 34, 50, 100, 200])
def test_every_depth_matches_arcface_torch(depth):
    with torch.device("meta"):
        model = build_backbone(f"iresnet{depth}")
    lines = "\n".join(f"{k}:{','.join(map(str, s))}" for k, s in sorted(shapes(model).items()))
    expected = UPSTREAM["digests"][f"iresnet{depth}"]
    assert len(model.state_dict()) == expected["count"]
    assert sum(p.numel() for p in model.parameters()) == expected["parameters"]
    assert hashlib.sha256(lines.encode()).hexdigest() == expected["sha256"]
    assert f"iresnet{depth}" in BACKBONES


def test_weights_round_trip_and_other_sizes_change_only_the_fc():
    torch.manual_seed(0)
    a = IResNet(18, embedding_size=16).eval()
    for m in a.modules():  # non-trivial running statistics, so a missed buffer would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    b = IResNet(18, embedding_size=16).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 112, 112)
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=0)
    small = shapes(IResNet(18, embedding_size=16, image_size=32))
    full = shapes(a)
    assert set(small) == set(full)
    assert [k for k in full if small[k] != full[k]] == ["fc.weight"]
    assert small["fc.weight"] == [16, 512 * 2 * 2]


def test_checkpoints_of_the_earlier_layout_still_load():
    torch.manual_seed(1)
    model = IResNet(18, embedding_size=8, image_size=16).eval()
    legacy = {}
    for key, value in model.state_dict().items():  # rename to the earlier stem/stages/output layout
        head, _, rest = key.partition(".")
        top = {"conv1": "stem.0", "bn1": "stem.1", "prelu": "stem.2", "bn2": "output.bn", "fc": "output.fc",
               "features": "output.features"}
        if head.startswith("layer"):
            block, name, tail = rest.split(".", 2)
            part = {"bn1": "residual.0", "conv1": "residual.1", "bn2": "residual.2", "prelu": "residual.3",
                    "conv2": "residual.4", "bn3": "residual.5", "downsample": "shortcut"}[name]
            key = f"stages.{int(head[5:]) - 1}.{block}.{part}.{tail}"
        else:
            key = f"{top[head]}.{rest}"
        legacy[key] = value.clone()
    fresh = IResNet(18, embedding_size=8, image_size=16).eval()
    fresh.load_state_dict(legacy)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- issue 18: the network from a state dict


def test_infer_iresnet_from_arcface_torch_keys():
    """The upstream r50 state dict's names and shapes (from the JSON) name r50,
    embedding 512, input 112x112, 3 channels."""
    from dcq_ops.training.backbones import infer_iresnet
    upstream = {k: torch.empty(s, device="meta") for k, s in UPSTREAM["iresnet50"].items()}
    assert infer_iresnet(upstream) == {"depth": 50, "blocks": (3, 4, 14, 3), "embedding_size": 512,
                                       "image_size": 112, "in_channels": 3}


@pytest.mark.parametrize("depth, embedding_size, image_size", [(18, 512, 112), (34, 128, 64), (50, 256, 112),
                                                               (100, 512, 112), (200, 64, 32)])
def test_infer_iresnet_every_depth(depth, embedding_size, image_size):
    from dcq_ops.training.backbones import IRESNET_DEPTHS, infer_iresnet
    with torch.device("meta"):  # names and shapes only: no weights are computed
        state = IResNet(depth, embedding_size=embedding_size, image_size=image_size).state_dict()
    assert infer_iresnet(state) == {"depth": depth, "blocks": IRESNET_DEPTHS[depth],
                                    "embedding_size": embedding_size, "image_size": image_size, "in_channels": 3}


def test_infer_iresnet_says_none_where_the_keys_do_not_tell():
    from dcq_ops.training.backbones import infer_iresnet
    with torch.device("meta"):
        small = build_backbone("small_cnn", embedding_size=8, image_size=16).state_dict()
        r18 = IResNet(18).state_dict()
    assert infer_iresnet(small)["depth"] is None and infer_iresnet(small)["blocks"] is None
    odd = {k: v for k, v in r18.items() if not k.startswith("layer3.1.")}  # blocks (2, 2, 1, 2): no IResNet
    assert infer_iresnet(odd)["blocks"] == (2, 2, 1, 2) and infer_iresnet(odd)["depth"] is None
    assert infer_iresnet({})["embedding_size"] is None and infer_iresnet({})["image_size"] is None
