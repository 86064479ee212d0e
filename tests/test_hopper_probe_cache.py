"""The on-disk cache of the Gluon sm_90 kernels' probe verdicts
(dcq_ops/triton/hopper_probe_cache.py): a verdict read back whole, a cache that is off,
writes that never share a temporary, and ranks writing the same verdict at once while
another reads it (the probe itself: tests/test_hopper_probe.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from dcq_ops.triton import hopper_probe_cache  # noqa: E402
from dcq_ops.triton.hopper_probe_class import ProbeClass  # noqa: E402

CLASS = ProbeClass.of_launch("pipelined", torch.float16, 20, 5 * 32 + 7, 32, 5 * 32, True, True, 16, 32, 2)


@pytest.fixture(autouse=True)
def _cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(hopper_probe_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(hopper_probe_cache.CACHE_ENV, raising=False)


def test_a_verdict_is_read_back_for_its_key_only(monkeypatch):
    key = hopper_probe_cache.key_of(torch.device("cpu"), CLASS)
    assert hopper_probe_cache.read(key) is None
    path = hopper_probe_cache.write(key, {"status": "passed", "what": "passed"})
    assert path.parent == Path(os.environ[hopper_probe_cache.CACHE_DIR_ENV])
    assert hopper_probe_cache.read(key) == ({"status": "passed", "what": "passed"}, path)
    other = hopper_probe_cache.key_of(torch.device("cpu"), CLASS._replace(filtering=False))
    assert hopper_probe_cache.path_of(other) != path and hopper_probe_cache.read(other) is None
    seesaw = hopper_probe_cache.key_of(torch.device("cpu"), CLASS._replace(kernel="seesaw"))  # another kernel
    assert hopper_probe_cache.path_of(seesaw) != path and hopper_probe_cache.read(seesaw) is None
    monkeypatch.setenv(hopper_probe_cache.CACHE_ENV, "0")  # off: nothing read, nothing written
    assert hopper_probe_cache.read(key) is None and hopper_probe_cache.write(other, {"status": "passed"}) is None
    assert not hopper_probe_cache.path_of(other).exists()


def test_the_cache_write_never_goes_through_a_shared_temporary(monkeypatch, tmp_path):
    # Another rank writing the same verdict at this moment holds PATH.tmp (atomic_write's
    # temporary): a write of this process must leave it alone and publish a whole file.
    key = hopper_probe_cache.key_of(torch.device("cpu"), CLASS)
    path = hopper_probe_cache.path_of(key)
    path.parent.mkdir(parents=True)
    other = Path(str(path) + ".tmp")
    other.write_text("another rank's half")
    assert hopper_probe_cache.write(key, {"status": "passed"}) == path
    assert other.read_text() == "another rank's half"
    assert hopper_probe_cache.read(key)[0] == {"status": "passed"}
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, other.name])


def test_concurrent_writers_and_a_reader_see_whole_files(tmp_path):
    # Ranks probing the same class at once: every read finds no file or a whole one.
    key = hopper_probe_cache.key_of(torch.device("cpu"), CLASS)
    code = ("import json, sys; sys.path.insert(0, sys.argv[1])\n"
            "from dcq_ops.triton import hopper_probe_cache as c\n"
            "key = json.loads(sys.argv[2])\n"
            "for i in range(40): assert c.write(key, {'status': 'passed', 'pad': 'x' * 20000, 'i': i})\n")
    root = str(Path(hopper_probe_cache.__file__).resolve().parents[2])
    env = dict(os.environ, **{hopper_probe_cache.CACHE_DIR_ENV: str(tmp_path / "cache")})
    writers = [subprocess.Popen([sys.executable, "-c", code, root, json.dumps(key)], env=env) for _ in range(3)]
    seen = 0
    while any(w.poll() is None for w in writers):
        found = hopper_probe_cache.read(key)
        if found is not None:
            assert found[0]["status"] == "passed" and len(found[0]["pad"]) == 20000
            seen += 1
    assert [w.wait() for w in writers] == [0, 0, 0]
    assert hopper_probe_cache.read(key) is not None
    assert not [p for p in hopper_probe_cache.path_of(key).parent.iterdir() if p.name.endswith(".tmp")]
