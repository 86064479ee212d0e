"""Launch configurations of the Triton kernels, derived from the GPU's compute
capability and its shared memory per block (no GPU needed to compute them, so
they are unit-tested for every architecture the build targets).

The queue-pass kernel keeps, per program, the accumulator [BLOCK_M, BLOCK_D]
fp32 in registers (on sm_100, in tensor memory) and, in shared memory, the
queue tiles [BLOCK_K, BLOCK_D] (num_stages deep), the rows q [BLOCK_M,
BLOCK_D] (wgmma reads its first operand there) and the probabilities
[BLOCK_M, BLOCK_K] (the second dot's operand). The candidates below are tried
in order and the first that fits is used (the autotuner tries every one that
fits).

benchmarks/compiled.py compiles every configuration chosen here for sm_80 and
sm_90 and checks the shared memory and registers that the compiler reports
against these estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

# The accumulator's fp32 registers per thread that a configuration may take
# (of 255): the rest holds the logits tile, addresses and the softmax.
ACCUMULATOR_REGISTERS = 128


@dataclass(frozen=True)
class Architecture:
    """What the configuration depends on: the compute capability and the
    shared memory a block may opt into (cudaDevAttrMaxSharedMemoryPerBlockOptin)."""

    name: str
    capability: tuple[int, int]
    shared_memory_per_block_optin: int
    example: str


# The architectures the build targets (TORCH_CUDA_ARCH_LIST's default).
ARCHITECTURES = {
    "sm_80": Architecture("sm_80", (8, 0), 166912, "A100"),
    "sm_86": Architecture("sm_86", (8, 6), 101376, "A10, RTX 30"),
    "sm_89": Architecture("sm_89", (8, 9), 101376, "L4, L40, RTX 40"),
    "sm_90": Architecture("sm_90", (9, 0), 232448, "H100, H200"),
    "sm_100": Architecture("sm_100", (10, 0), 232448, "B200"),
}


@dataclass(frozen=True)
class TileConfig:
    block_m: int
    block_k: int
    num_warps: int
    num_stages: int

    def shared_bytes(self, block_d: int, element_size: int, family: str = "mma.sync") -> int:
        """An upper bound of the shared memory: the rows q, the queue tiles (Triton
        double-buffers them even at one stage), the probabilities, and Triton's
        scratch (more with tcgen05, which also stages operands for the tensor memory)."""
        stages = max(2, self.num_stages)
        tiles = self.block_m * block_d + stages * self.block_k * block_d + self.block_m * self.block_k
        return tiles * element_size + _SLACK[family]

    def accumulator_registers(self, block_d: int) -> int:
        return self.block_m * block_d // (32 * self.num_warps)

    def as_dict(self) -> dict:
        return dict(BLOCK_M=self.block_m, BLOCK_K=self.block_k, num_warps=self.num_warps, num_stages=self.num_stages)


def mma_family(capability: tuple[int, int]) -> str:
    """How Triton multiplies on this architecture: mma.sync (sm_8x), wgmma (sm_90), tcgen05 (sm_100+)."""
    major = capability[0]
    return "mma.sync" if major < 9 else ("wgmma" if major == 9 else "tcgen05")


# Triton's own shared-memory scratch beyond the operand tiles, per family,
# from the compiled kernels (benchmarks/compiled.py: shared vs these estimates).
_SLACK = {"mma.sync": 8 << 10, "wgmma": 8 << 10, "tcgen05": 40 << 10}

_C = TileConfig
# Candidates per (MMA family, operand kind), best guesses first: more rows per
# program reuse each queue tile more; two stages or more hide the loads.
# Every one of them compiles without spilling registers at D=512 for the
# architectures of its family (benchmarks/compiled.py checks it in CI): the
# configurations that spilled were taken out, e.g. (64, 32, 8, *) with wgmma
# and (32, 32, 4, 2) with mma.sync; and, once the queue pass carried non-finite
# cosines into the row sums (docs/loss.md, "Non-finite input": a few registers
# more), (64, 32, 8, 2) with mma.sync and (32, 32, 4, 2) with wgmma (24-40 B). 16-bit operands run on the tensor cores;
# fp32 with exact ("ieee") products on the FMA units, whose dot keeps whole
# operand tiles in registers (thin queue tiles); fp32 as TF32 on the tensor cores.
# With wgmma, (64, 64, 8, 2) does the ideal work (each MMA once, 1.125 exponentials
# a logit: the first dot laid out [4, 2], dcq_ops/triton/kernels.py) in 200 KiB of
# shared memory; with mma.sync the dots stay linked through W (all warps along
# BLOCK_K) and the tiles that would be ideal spill or reuse each queue tile for 16
# rows only (benchmarks/compiled.py states the ratios of every default).
#
# Every candidate compiles without spilling under each Triton version the package
# supports (3.8, torch 2.14's, and 3.6, torch 2.11's: compiled.json holds both).
# Under 3.6, (32, 16, 4, 2) spills 16 B on sm_86 and sm_90, TF32 (16, 16, 4, 2) 36 B
# on sm_80 and TF32 (16, 16, 4, 1) 4 B on sm_100; they were replaced by (32, 32, 8, 2)
# (the same MMA FLOPs / ideal, 1.5, at 170 registers: sm_80's default; its
# shared-memory estimate exceeds sm_86's 99 KiB, so sm_86 / sm_89 default to the
# ideal-work 16 x 32) and, on tcgen05, TF32 (16, 16, 8, 1).
_CANDIDATES = {
    ("mma.sync", "16bit"): (_C(64, 64, 8, 2), _C(32, 32, 8, 2), _C(16, 32, 4, 2), _C(16, 16, 4, 1)),
    ("wgmma", "16bit"): (_C(64, 64, 8, 2), _C(32, 32, 8, 2), _C(16, 32, 4, 2), _C(16, 16, 4, 1)),
    ("tcgen05", "16bit"): (_C(64, 32, 8, 3), _C(64, 32, 8, 2), _C(32, 16, 4, 2), _C(16, 32, 4, 2),
                           _C(16, 16, 4, 1)),
    "ieee": (_C(32, 16, 8, 2), _C(32, 16, 8, 1), _C(16, 16, 4, 2), _C(16, 16, 4, 1)),
    "tf32": (_C(32, 16, 8, 1), _C(16, 16, 4, 1)),
    ("tcgen05", "tf32"): (_C(32, 16, 8, 1), _C(16, 16, 8, 1)),
}


def block_d_of(dim: int) -> int:
    """The padded embedding size of a tile: a power of two, at least 16."""
    return max(16, 1 << max(0, int(dim) - 1).bit_length())


def candidates(architecture: Architecture, element_size: int, tf32: bool = False) -> tuple[TileConfig, ...]:
    """Every candidate of this architecture's family for these operands, before the fit."""
    family = mma_family(architecture.capability)
    if element_size == 4:
        return _CANDIDATES.get((family, "tf32"), _CANDIDATES["tf32"]) if tf32 else _CANDIDATES["ieee"]
    return _CANDIDATES[(family, "16bit")]


def tile_configs(architecture: Architecture, element_size: int, dim: int, tf32: bool = False) -> list[TileConfig]:
    """Every candidate configuration that fits ``architecture`` for operands of
    ``element_size`` bytes (fp32 as TF32 with ``tf32``) and embeddings of size
    ``dim``, best first (never empty: the smallest tile is the fallback)."""
    block_d = block_d_of(dim)
    family = mma_family(architecture.capability)
    options = candidates(architecture, element_size, tf32)
    fits = [c for c in options
            if c.shared_bytes(block_d, element_size, family) <= architecture.shared_memory_per_block_optin
            and c.accumulator_registers(block_d) <= ACCUMULATOR_REGISTERS]
    if fits:
        return fits
    # Very wide embeddings: the smallest tile, even if it spills (then said once:
    # a silent slowdown otherwise).
    smallest = options[-1]
    if smallest.accumulator_registers(block_d) > ACCUMULATOR_REGISTERS:
        from dcq_ops.downgrades import note  # here: configs imports nothing of the package

        note(f"a queue-pass tile whose accumulator fits the registers at D={dim} ({element_size}-byte operands, "
             f"{architecture.name})",
             f"the smallest tile {smallest.as_dict()} is used, with {smallest.accumulator_registers(block_d)} "
             f"accumulator registers a thread (of {ACCUMULATOR_REGISTERS} budgeted)",
             "register spills: the same results, a slower queue pass",
             "backend='chunked' for embeddings this wide, or a smaller embedding size", backend="triton")
    return [smallest]


def tile_config(architecture: Architecture, element_size: int, dim: int, tf32: bool = False) -> TileConfig:
    """The configuration used when autotuning is off: the first that fits."""
    return tile_configs(architecture, element_size, dim, tf32)[0]


def architecture_of(capability: tuple[int, int], shared_memory_per_block_optin: int) -> Architecture:
    """The Architecture of a device (torch.cuda.get_device_properties gives both numbers)."""
    major, minor = capability
    return Architecture(f"sm_{major}{minor}", (major, minor), int(shared_memory_per_block_optin), "this GPU")
