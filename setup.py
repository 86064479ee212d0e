"""Build of dcq_ops and its compiled extension dcq_ops._C.

The extension's sources are listed once, in csrc/sources.txt (CMakeLists.txt
reads the same file). CPU kernels are always built; the CUDA kernels as well
when the installed torch has CUDA and nvcc is found. Set DCQ_OPS_REQUIRE_CUDA=1
to fail instead of silently building CPU-only (CI does), DCQ_OPS_CPU_ONLY=1 to
skip the CUDA kernels (a quicker build), DCQ_OPS_NO_EXTENSION=1 to build the
pure-Python package only.

Build with the torch that will run it: `pip install --no-build-isolation .`.
Without torch in the build environment (a plain isolated `pip install .`), the
package is installed without the extension, and `import dcq_ops` says so.

The compiled objects are kept in build/temp-dcq_ops-* (one directory per torch,
Python, CPU/CUDA and architecture list), not in the temporary directory pip
gives each build: a rebuild with the same configuration recompiles only the
sources (and headers) that changed, through ninja's dependency files and
command lines. scripts/build.sh skips pip altogether when nothing changed.
"""

import hashlib
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def read_sources():
    lines = (CSRC / "sources.txt").read_text().splitlines()
    sources = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    cpu = [f"csrc/{s}" for s in sources if not s.endswith(".cu")]
    cuda = [f"csrc/{s}" for s in sources if s.endswith(".cu")]
    return cpu, cuda


def cuda_include_dirs():
    """Headers of the CUDA toolkit wheels (cusparse.h and friends) that torch's headers include."""
    dirs = []
    for entry in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include"):
            candidate = Path(entry) / sub
            if candidate.is_dir():
                dirs.append(str(candidate))
    return dirs


def openmp_flags(torch) -> list:
    """at::parallel_for is a header template: with torch's OpenMP backend it runs
    in parallel only when the extension is compiled with -fopenmp (else every
    parallel_for of csrc/cpu runs on one thread). Compile only: the GOMP symbols
    resolve, at load time, to the OpenMP runtime torch itself loaded, so the
    process never holds two runtimes."""
    info = torch.__config__.parallel_info()
    if "backend: OpenMP" not in info or sys.platform in ("darwin", "win32"):
        return []
    return ["-fopenmp", "-DAT_PARALLEL_OPENMP=1"]


def persistent_build_temp(torch, with_cuda: bool) -> str:
    """The directory of the compiled objects for this configuration, kept across builds."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    key = "\n".join((sys.version, torch.__version__, str(torch.version.git_version), str(with_cuda), arch_list))
    tag = "cuda" if with_cuda else "cpu"
    return str(ROOT / "build" / f"temp-dcq_ops-{torch.__version__}-{tag}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")


def build_ext_command(base, build_temp: str):
    """``base`` (torch's BuildExtension) compiling into ``build_temp`` whatever build
    directory setuptools chose (an editable install chooses a new temporary one each time,
    which made every install recompile everything)."""

    class BuildExtensionKeepingObjects(base):
        def run(self):
            self.build_temp = build_temp
            super().run()

    return BuildExtensionKeepingObjects


def build_extensions():
    if os.environ.get("DCQ_OPS_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "dcq_ops: torch is not importable in the build environment, so the compiled "
            "extension is NOT built. Install torch first, then `pip install --no-build-isolation .`.",
            file=sys.stderr,
        )
        if os.environ.get("DCQ_OPS_REQUIRE_CUDA") == "1":
            raise SystemExit("DCQ_OPS_REQUIRE_CUDA=1 but torch is not importable at build time")
        return [], {}

    cpu_sources, cuda_sources = read_sources()
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if os.environ.get("DCQ_OPS_CPU_ONLY") == "1":  # a quick CPU-only build while developing
        with_cuda = False
    if os.environ.get("DCQ_OPS_REQUIRE_CUDA") == "1" and not with_cuda:
        raise SystemExit(
            f"DCQ_OPS_REQUIRE_CUDA=1 but CUDA kernels cannot be built: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    # No -std flag: torch's cpp_extension picks the standard its headers need
    # (C++17 for torch 2.11, C++20 for newer releases).
    extra = {"cxx": ["-O3"] + openmp_flags(torch)}
    define_macros = []
    if with_cuda:
        # Without a GPU to detect: every architecture the Triton configs are chosen for
        # (dcq_ops/triton/configs.py), A100 to B200, and PTX for newer ones.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0;10.0+PTX")
        define_macros.append(("WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-DWITH_CUDA"]
        ext = cpp_extension.CUDAExtension(
            "dcq_ops._C",
            cpu_sources + cuda_sources,
            include_dirs=[str(CSRC)] + cuda_include_dirs(),
            extra_compile_args=extra,
            define_macros=define_macros,
            py_limited_api=True,
        )
    else:
        ext = cpp_extension.CppExtension(
            "dcq_ops._C",
            cpu_sources,
            include_dirs=[str(CSRC)],
            extra_compile_args=extra,
            define_macros=define_macros,
            py_limited_api=True,
        )
    build_temp = persistent_build_temp(torch, with_cuda)
    print(f"dcq_ops: building dcq_ops._C ({'CPU + CUDA' if with_cuda else 'CPU only'}) against torch "
          f"{torch.__version__}, objects in {build_temp}")
    return [ext], {"build_ext": build_ext_command(cpp_extension.BuildExtension, build_temp)}


ext_modules, cmdclass = build_extensions()

setup(
    packages=find_packages(include=["dcq_ops", "dcq_ops.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
