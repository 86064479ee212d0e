"""Installs rebuild only what changed (scripts/build_stamp.py, scripts/build.sh): a
second install with nothing changed skips the build; a change of a source, a header,
torch, the architecture list or a build flag rebuilds. On a fake checkout: no compiler runs."""

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("build_stamp", ROOT / "scripts" / "build_stamp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_stamp = _load()
_TORCH = {}  # the torch the fake checkout is built against


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A checkout with sources, a header, the build files and a built extension, and a
    fixed torch and toolchain (their real lookups are tested below)."""
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    (tmp_path / "csrc" / "cpu" / "queue_pass.cpp").write_text("int f() { return 1; }\n")
    (tmp_path / "csrc" / "margin_ce.h").write_text("#pragma once\n")
    (tmp_path / "csrc" / "sources.txt").write_text("cpu/queue_pass.cpp\n")
    (tmp_path / "setup.py").write_text("# setup\n")
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "dcq_ops").mkdir()
    (tmp_path / "dcq_ops" / "_C.abi3.so").write_bytes(b"\x7fELF built")
    _TORCH["identity"] = "torch 2.14.1"
    monkeypatch.setattr(build_stamp, "torch_identity", lambda: _TORCH["identity"])
    monkeypatch.setattr(build_stamp, "toolchain", lambda environ: {"cxx": "g++ 13", "nvcc": "nvcc 13.0"})
    return tmp_path


ENV = {"TORCH_CUDA_ARCH_LIST": "9.0", "CUDA_HOME": "/usr/local/cuda"}


def _installed(root, environ):
    return None


def _fresh(root, environ=ENV):
    return build_stamp.up_to_date(root, environ, check_installed=_installed)


def test_second_install_with_nothing_changed_skips_the_build(checkout):
    assert _fresh(checkout) == (False, ["no stamp of an earlier build"])
    build_stamp.write(checkout, ENV)
    assert _fresh(checkout) == (True, [])
    # A touch (new mtime, same content) is no change.
    os.utime(checkout / "csrc" / "cpu" / "queue_pass.cpp", (1, 1))
    assert _fresh(checkout) == (True, [])


@pytest.mark.parametrize("change,reason", [
    (lambda root: (root / "csrc" / "cpu" / "queue_pass.cpp").write_text("int f() { return 2; }\n"),
     "sources: csrc/cpu/queue_pass.cpp"),
    (lambda root: (root / "csrc" / "margin_ce.h").write_text("#pragma once\n// changed\n"),
     "sources: csrc/margin_ce.h"),
    (lambda root: (root / "csrc" / "cuda").mkdir() or (root / "csrc" / "cuda" / "new.cu").write_text("\n"),
     "sources: csrc/cuda/new.cu"),
    (lambda root: (root / "setup.py").write_text("# setup, changed\n"), "sources: setup.py"),
    (lambda root: (root / "dcq_ops" / "_C.abi3.so").write_bytes(b"\x7fELF another build"),
     "extension: _C.abi3.so"),
    (lambda root: _TORCH.update(identity="torch 2.11.0"), "torch"),
])
def test_a_changed_input_rebuilds(checkout, change, reason):
    build_stamp.write(checkout, ENV)
    change(checkout)
    assert _fresh(checkout) == (False, [reason])


@pytest.mark.parametrize("name,value", [("TORCH_CUDA_ARCH_LIST", "8.0;9.0"), ("TORCH_CUDA_ARCH_LIST", None),
                                        ("DCQ_OPS_CPU_ONLY", "1"), ("CXXFLAGS", "-O0")])
def test_a_changed_build_variable_rebuilds(checkout, name, value):
    build_stamp.write(checkout, ENV)
    environ = {k: v for k, v in dict(ENV, **{name: value}).items() if v is not None}
    assert _fresh(checkout, environ) == (False, [f"environment: {name}"])


def test_an_install_that_does_not_load_rebuilds(checkout):
    build_stamp.write(checkout, ENV)
    fresh, reasons = build_stamp.up_to_date(checkout, ENV, check_installed=lambda root, env: "the extension does "
                                            "not load: undefined symbol")
    assert not fresh and reasons == ["the extension does not load: undefined symbol"]


def test_forced_build(checkout):
    build_stamp.write(checkout, ENV)
    assert _fresh(checkout, dict(ENV, DCQ_OPS_FORCE_BUILD="1")) == (False, ["DCQ_OPS_FORCE_BUILD=1"])


def test_torch_and_toolchain_are_read_without_importing_torch():
    # The real lookups: torch's version.py (version, commit, CUDA) and the compilers' --version.
    identity = build_stamp.torch_identity()
    assert "__version__" in identity and "git_version" in identity
    tools = build_stamp.toolchain({"CXX": "c++"})
    assert set(tools) == {"cxx", "nvcc"}


def test_this_checkout_stamps_every_source_of_the_extension():
    # Every source csrc/sources.txt lists (and every header) is an input of the stamp.
    digests = build_stamp.source_digests(ROOT)
    listed = [line.strip() for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    assert listed and all(f"csrc/{name}" in digests for name in listed)
    assert any(name.endswith(".h") for name in digests) and "setup.py" in digests
