"""Compiling a Triton kernel for a GPU target without a GPU, as its launcher
would, and what ptxas says of it, for benchmarks/compiled.py.

Entry points: ``compile_kernel(fn, signature, constants, aligned, arch, **options)``,
``launch_specialization(fn, name, value)``, ``ptxas_log(compiled, arch)`` (registers,
spill bytes and ptxas's warnings, from the very ptxas command Triton runs).
"""

from __future__ import annotations

import contextlib
import io
import os
import re

# The kernels must be decorated for the compiler, not for Triton's CPU interpreter.
os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


def launch_specialization(fn, name: str, value):
    """How Triton's launcher specialises argument ``name`` of ``fn`` for ``value``: its
    (type, attribute) from the same native function the launcher calls, with the
    kernel's do_not_specialize flags: ("constexpr", value) when it would be folded."""
    param = next(p for p in fn.params if p.name == name)
    return native_specialize_impl(CUDABackend, value, False, not param.do_not_specialize,
                                  not param.do_not_specialize_on_alignment)


def compile_kernel(fn, signature, constants, aligned, arch, **options):
    """``fn`` compiled for ``arch``: ``signature`` the types of its run-time arguments,
    ``constants`` the values of the others (constexpr, or folded as Triton's launcher
    folds a 1), ``aligned`` the arguments with a divisibility hint (16). Arguments are
    placed by their position in ``fn``, whatever the order of the dictionaries."""
    types = dict(signature, **{name: "constexpr" for name in constants})
    signature = {name: types[name] for name in fn.arg_names}
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    return triton.compile(ASTSource(fn, signature, constexprs=constants, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


# ptxas's performance advisories (e.g. "(C7515) Potential Performance Loss: wgmma.mma_async
# instructions are serialized ...", printed as "info") and its warnings.
_ADVISORY = re.compile(r"^ptxas\s+warning\b.*$|^ptxas.*\(C\d{4}\).*$|^ptxas.*[Pp]erformance.*$", re.M)


def ptxas_log(compiled, arch: int) -> dict:
    """Registers per thread, spill bytes (the larger of stores and loads) and the
    warnings and performance advisories of ptxas, for a kernel compiled by
    compile_kernel: its PTX assembled again by Triton's own backend with ptxas's log
    printed (TRITON_DUMP_PTXAS_LOG), i.e. the command and options of this Triton
    version, whatever its compile cache held."""
    backend = CUDABackend(GPUTarget("cuda", arch, 32))
    metadata = compiled.metadata._asdict()
    options = backend.parse_options({k: v for k, v in metadata.items() if k != "arch"})
    out = io.StringIO()
    previous = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with contextlib.redirect_stdout(out):
            backend.make_cubin(compiled.asm["ptx"], {}, options, arch)
    finally:
        if previous is None:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = previous
    return parse_ptxas_log(out.getvalue())


def parse_ptxas_log(text: str) -> dict:
    """registers, spill_bytes and ptxas_warnings (each advisory or warning line once,
    in order, without the "ptxas info/warning :" prefix) of a ``ptxas -v`` log."""
    registers = [int(n) for n in re.findall(r"Used (\d+) registers", text)]
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    if not registers:
        raise RuntimeError(f"no register count in the ptxas log: {text[-2000:]}")
    warnings = []
    for line in _ADVISORY.findall(text):
        message = re.sub(r"^ptxas[^:]*:\s*", "", line).strip()
        if message not in warnings:
            warnings.append(message)
    return dict(registers=max(registers), spill_bytes=max(spills or [0]), ptxas_warnings=warnings)
