"""The probe class of a launch of a Gluon sm_90 kernel
(dcq_ops/triton/hopper_probe_class.py): the small launch the probe runs has the class of
the launch it stands for, its tile counts keep their residue modulo the period of the
mbarrier phases (lcm(2 STAGES, 4)), the kernel is part of the class, and a malformed
class is refused."""

import json

import pytest
import torch

from dcq_ops.triton.hopper_probe_class import ProbeClass, cdiv, period, representative_tiles

CLASS = ProbeClass.of_launch("pipelined", torch.float16, 20, 5 * 32 + 7, 32, 5 * 32, True, True, 16, 32, 2)


@pytest.mark.parametrize("kernel, stages", [("pipelined", 2), ("pipelined", 3), ("seesaw", 2), ("seesaw", 3),
                                           ("seesaw", 4)])
def test_the_representative_launch_has_the_class_of_the_launch(kernel, stages):
    """Every program of the small launch runs the representative tile counts: the class of
    the small launch is the class itself, and its counts keep the residue modulo the
    period: that of each buffer's phase bit (2 STAGES) and of each seesaw consumer's
    hand-over phase bit (4)."""
    generator = torch.Generator().manual_seed(7)
    for _ in range(300):
        rows = int(torch.randint(1, 700, (1,), generator=generator))
        tiles = int(torch.randint(1, 300, (1,), generator=generator))
        split_size = 64 * tiles
        slots = int(torch.randint(1, 6 * split_size, (1,), generator=generator))
        c = ProbeClass.of_launch(kernel, torch.bfloat16, rows, slots, 512, split_size, True, False, 64, 64, stages)
        small_rows, small_slots, small_split = c.launch_shape()
        assert ProbeClass.of_launch(kernel, torch.bfloat16, small_rows, small_slots, 512, small_split, True, False,
                                    64, 64, stages) == c
        last = cdiv(slots - (cdiv(slots, split_size) - 1) * split_size, 64)
        for cycle in (2 * stages, 4):
            assert c.tiles_last % cycle == last % cycle
            if c.splits > 1:
                assert c.tiles_full % cycle == tiles % cycle
        assert c.tiles_last < 3 * period(stages) and (c.splits == 1 or c.tiles_full >= c.tiles_last)
        assert ProbeClass.from_json(c.to_json()) == c
    assert [representative_tiles(n, 2) for n in (1, 7, 8, 9, 11, 12, 13, 1001)] == [1, 7, 8, 9, 11, 8, 9, 9]
    # Three buffers: the phases repeat every 12 tiles (6 would mix the hand-over's parities).
    assert period(3) == 12 and [representative_tiles(n, 3) for n in (23, 24, 30, 36, 37)] == [23, 24, 30, 24, 25]


def test_a_malformed_class_is_refused():
    with pytest.raises(ValueError, match="dim"):
        ProbeClass.from_json(json.dumps(dict(CLASS._asdict(), dim="64")))
    with pytest.raises(ValueError, match="fields"):
        ProbeClass.from_json(json.dumps({"dtype": "float16"}))


def test_the_kernel_is_part_of_the_class():
    """The same launch of the seesaw and of the pipelined kernel: two classes (their
    verdicts, in memory and on disk, are keyed on it), said in words, kept through JSON."""
    seesaw = ProbeClass.of_launch("seesaw", torch.float16, 20, 5 * 32 + 7, 32, 5 * 32, True, True, 16, 32, 2)
    assert seesaw == CLASS._replace(kernel="seesaw") and seesaw != CLASS
    assert seesaw.words().startswith("the seesaw kernel") and CLASS.words().startswith("the pipelined kernel")
    assert ProbeClass.from_json(seesaw.to_json()).kernel == "seesaw"
    with pytest.raises(ValueError, match="kernel must be one of pipelined, seesaw, got 'classic'"):
        ProbeClass.of_launch("classic", torch.float16, 20, 200, 32, 64, True, True, 16, 32, 2)
    with pytest.raises(ValueError, match="'kernel' must be one of pipelined, seesaw, got 'fast'"):
        ProbeClass.from_json(json.dumps(dict(CLASS._asdict(), kernel="fast")))
    without = {k: v for k, v in CLASS._asdict().items() if k != "kernel"}  # a class written before the field
    with pytest.raises(ValueError, match="fields"):
        ProbeClass.from_json(json.dumps(without))
