"""Whether the installed build of dcq_ops is up to date, so that scripts/build.sh
(run by install.sh, test.sh, benchmark.sh and gpu_check.sh) skips pip when nothing
the build depends on has changed.

The stamp (build/install-stamp.json, written after a successful build) holds a
digest of every input of the build: the content of every file under csrc/ and of
setup.py and pyproject.toml, the torch that builds it (its version.py: version, git
commit, CUDA version), the Python, the compilers (``c++ --version``, nvcc's path and
``--version``), the environment variables the build reads (TORCH_CUDA_ARCH_LIST,
CUDA_HOME, DCQ_OPS_*, CC/CXX and flags) and the built extension file itself. The
build is up to date when the digest matches AND ``import dcq_ops``, from outside the
repository, loads this checkout's package with its extension (with CUDA kernels when
DCQ_OPS_REQUIRE_CUDA=1). Anything else rebuilds; setup.py keeps its objects in
build/, so a rebuild recompiles only what changed (ninja).

    python scripts/build_stamp.py check   # exit 0: up to date (says so), 1: rebuild (says why)
    python scripts/build_stamp.py write   # after a successful build
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAMP = Path("build") / "install-stamp.json"

# The build's own files; every file under csrc/ counts (sources, headers, sources.txt).
BUILD_FILES = ("setup.py", "pyproject.toml")
SOURCE_DIRS = ("csrc",)

# What setup.py and torch.utils.cpp_extension read from the environment.
ENVIRONMENT = ("TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH", "DCQ_OPS_CPU_ONLY", "DCQ_OPS_REQUIRE_CUDA",
               "DCQ_OPS_NO_EXTENSION", "CC", "CXX", "CFLAGS", "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "NVCC_FLAGS",
               "NVCC_APPEND_FLAGS", "NVCC_PREPEND_FLAGS", "TORCH_EXTENSION_SKIP_NVCC_GEN_DEPENDENCIES")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_digests(root: Path) -> dict:
    """{relative path: sha256 of its content} of every build input file (content, not
    mtime: a checkout or a touch that changes nothing rebuilds nothing)."""
    files = [root / name for name in BUILD_FILES if (root / name).is_file()]
    for directory in SOURCE_DIRS:
        files += sorted(p for p in (root / directory).rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return {str(p.relative_to(root)): _file_digest(p) for p in files}


def _command_output(command: list) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable: {exc}"
    return done.stdout.strip()


def torch_identity() -> str:
    """torch's version.py (version, git commit, CUDA), read without importing torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return "torch not installed"
    version_file = Path(spec.origin).parent / "version.py"
    return f"{spec.origin}\n" + (version_file.read_text() if version_file.is_file() else "no version.py")


def toolchain(environ) -> dict:
    """The compilers the build would use (cpp_extension: $CXX or c++; nvcc from CUDA_HOME,
    CUDA_PATH or PATH)."""
    cxx = environ.get("CXX") or "c++"
    cuda_home = environ.get("CUDA_HOME") or environ.get("CUDA_PATH")
    nvcc = str(Path(cuda_home) / "bin" / "nvcc") if cuda_home else (shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    return {"cxx": cxx + "\n" + _command_output([cxx, "--version"]),
            "nvcc": nvcc + "\n" + (_command_output([nvcc, "--version"]) if os.path.exists(nvcc) else "absent")}


def extension_files(root: Path) -> dict:
    """{name: sha256} of the built extension(s) in the package directory."""
    return {p.name: _file_digest(p) for p in sorted((root / "dcq_ops").glob("_C*.so")) + sorted(
        (root / "dcq_ops").glob("_C*.pyd"))}


def stamp(root: Path = ROOT, environ=None) -> dict:
    """Every input of the build, as a dict (what ``write`` stores and ``check`` compares)."""
    environ = os.environ if environ is None else environ
    return {
        "sources": source_digests(root),
        "torch": _digest(torch_identity().encode()),
        "python": sys.version + "\n" + sys.executable,
        "environment": {name: environ.get(name) for name in ENVIRONMENT},
        "toolchain": {k: _digest(v.encode()) for k, v in toolchain(environ).items()},
        "extension": extension_files(root),
    }


def changes(old: dict | None, new: dict) -> list[str]:
    """What differs between two stamps, in words (empty when they match)."""
    if not old:
        return ["no stamp of an earlier build"]
    found = []
    for key in new:
        a, b = old.get(key), new[key]
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            names = sorted(n for n in set(a) | set(b) if a.get(n) != b.get(n))
            found.append(f"{key}: {', '.join(names)}")
        else:
            found.append(key)
    return found


def installed_problem(root: Path = ROOT, environ=None) -> str | None:
    """None when ``import dcq_ops``, run outside the repository, finds this checkout's
    package with its extension loaded (and CUDA kernels with DCQ_OPS_REQUIRE_CUDA=1);
    else what is wrong."""
    environ = dict(os.environ if environ is None else environ)
    code = (
        "import os, sys, dcq_ops\n"
        "print(os.path.dirname(os.path.realpath(dcq_ops.__file__)))\n"
        "print(dcq_ops.EXTENSION_ERROR or 'loaded')\n"
        "print(dcq_ops.has_cuda_kernels())\n")
    environ.pop("PYTHONPATH", None)  # the installed package, not one on a path
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                          env=environ, timeout=300)
    if done.returncode != 0:
        return f"import dcq_ops failed: {done.stderr.strip().splitlines()[-1:]}"
    lines = done.stdout.strip().splitlines()[-3:]
    if len(lines) < 3:
        return f"import dcq_ops printed {done.stdout!r}"
    package, extension, cuda = lines
    if os.path.realpath(package) != os.path.realpath(root / "dcq_ops"):
        return f"import dcq_ops finds {package}, not this checkout's {root / 'dcq_ops'}"
    if extension != "loaded":
        return f"the extension does not load: {extension}"
    if environ.get("DCQ_OPS_REQUIRE_CUDA") == "1" and cuda != "True":
        return "DCQ_OPS_REQUIRE_CUDA=1 and the extension has no CUDA kernels"
    return None


def read(root: Path = ROOT) -> dict | None:
    try:
        return json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return None


def write(root: Path = ROOT, environ=None) -> dict:
    """Store the stamp of the build just made (build/install-stamp.json)."""
    data = stamp(root, environ)
    path = root / STAMP
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return data


def up_to_date(root: Path = ROOT, environ=None, check_installed=installed_problem) -> tuple[bool, list[str]]:
    """(whether the installed build is up to date, the reasons when not)."""
    environ = os.environ if environ is None else environ
    if environ.get("DCQ_OPS_FORCE_BUILD") == "1":
        return False, ["DCQ_OPS_FORCE_BUILD=1"]
    reasons = changes(read(root), stamp(root, environ))
    if reasons:
        return False, reasons
    problem = check_installed(root, environ)
    return (problem is None), ([problem] if problem else [])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["check"]:
        fresh, reasons = up_to_date()
        if fresh:
            print(f"dcq_ops: the installed build is up to date ({STAMP} matches the sources, torch, "
                  "toolchain and environment): not rebuilding (DCQ_OPS_FORCE_BUILD=1 forces it)")
            return 0
        print("dcq_ops: building, because: " + "; ".join(reasons))
        return 1
    if argv == ["write"]:
        write()
        return 0
    print("usage: python scripts/build_stamp.py check|write", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
