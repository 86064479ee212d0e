"""Every instruction-set variant of the chunked backend's CPU epilogue (plain
C++, AVX2, AVX-512), and every provider of its fp32 tile GEMMs (ATen's BLAS,
the own AVX-512 kernels), that this CPU can run computes the loss within the
error model: the numerics tests of tests/test_chunked.py (and the non-finite
ones of tests/test_nonfinite.py for the GEMMs), run again in a process whose
ATEN_CPU_CAPABILITY or DCQ_OPS_CPU_GEMM picks the variant (each is chosen once
per process)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dcq_ops

pytestmark = pytest.mark.skipif(not dcq_ops.extension_loaded(), reason=f"{dcq_ops.EXTENSION_ERROR}")

TESTS = Path(__file__).resolve().parent
ORDER = ["default", "avx2", "avx512"]


def runnable(capability: str) -> bool:
    best = torch.backends.cpu.get_cpu_capability().lower()
    best = "avx512" if best.startswith("avx512") else best
    return best in ORDER and ORDER.index(capability) <= ORDER.index(best)


@pytest.mark.parametrize("capability", ORDER)
def test_epilogue_variant_within_the_error_model(capability):
    if not runnable(capability):
        pytest.skip(f"this CPU cannot run the {capability} variant")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    env.pop("DCQ_OPS_CPU_GEMM", None)  # a narrower capability may lack the named GEMMs: let it choose
    chosen = subprocess.run([sys.executable, "-c", "import dcq_ops._extension as e; print(e.cpu_capability())"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert chosen.stdout.strip() == capability, chosen.stdout + chosen.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_chunked.py"),
                          "-k", "matches_reference or sixteen_bit or chunks_and_threads or confident or empty_queue"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=TESTS.parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


@pytest.mark.parametrize("provider", ["aten", "avx512"])
def test_gemm_provider_within_the_error_model(provider):
    if provider not in dcq_ops.cpu_gemm_providers():
        pytest.skip(f"this CPU cannot run the {provider} GEMMs")
    env = dict(os.environ, DCQ_OPS_CPU_GEMM=provider)
    chosen = subprocess.run([sys.executable, "-c", "import dcq_ops; print(dcq_ops.cpu_gemm_provider())"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert chosen.stdout.strip() == provider, chosen.stdout + chosen.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_chunked.py"),
                          str(TESTS / "test_nonfinite.py"), "-k",
                          "(matches_reference or sixteen_bit or chunks_and_threads or confident or empty_queue or "
                          "partials or chunked_op or huge_magnitudes_chunked or slices and chunked) "
                          "and not every_cpu_epilogue_variant"],
                         capture_output=True, text=True, env=env, timeout=600, cwd=TESTS.parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
