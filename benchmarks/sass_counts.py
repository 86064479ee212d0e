"""SASS of a compiled kernel, read without a GPU: the disassembly, its loops, and
what one iteration of a loop issues.

Entry points (benchmarks/cycle_model.py builds its per-tile estimate on them):

    disassemble(cubin)        -> SASS text (nvdisasm from Triton's own bin/)
    loops(sass)               -> [Loop]: each back-edge branch and the body it closes
    mma_loop(sass)            -> the innermost loop with the most MMA instructions
    exponentials_under_mma(body) -> MUFU.EX2 issued while the body's own wgmma are in flight
    count(body)               -> per-thread (= per-warp) counts of one pass through a body

A loop is found by its back-edge: a branch (``BRA``) to a label that comes before
it. Its body is everything from the label to the branch; a forward branch inside
it (an ``if``) is counted as if both sides ran, which is what one iteration costs
at most. Instructions predicated ``@!PT`` never execute (ptxas pads with them) and
are left out of every count.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

# "/*2270*/    @!P1 BRA `(.L_x_2) ;"  and  ".L_x_2:"
_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?P<pred>@!?U?P[T\d]+\s+)?(?P<op>[A-Z][A-Za-z0-9_.]*)(?P<args>[^;]*);",
                          re.M)
_LABEL = re.compile(r"^(\.L_[\w]+):", re.M)
_BRANCH_TARGET = re.compile(r"`?\(?(\.L_[\w]+)\)?")
# "HGMMA.64x32x16.F32.BF16 R152, gdesc[UR56], RZ, !UPT, gsb0" (both operands in shared memory)
# "HGMMA.64x256x16.F32.BF16 R24, R216, gdesc[UR8].tnspB, R24, gsb0" (A from registers)
# fp16 operands print no operand type: "HGMMA.64x32x16.F32 R152, gdesc[UR4], RZ, !UPT".
_HGMMA = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)\.(\w+)(?:\.(\w+))?")
# "HMMA.16816.F32.BF16 R4, R8, R12, R4" (mma.sync m16n8k16, one per warp); "HMMA.1688.F32.TF32" (m16n8k8).
_HMMA = re.compile(r"^HMMA\.(16)(8)(8|16)\b")
_WIDTH = re.compile(r"\.(128|64|32|16|U8|S8|U16|S16)\b")
_WIDTH_BYTES = {"128": 16, "64": 8, "32": 4, "16": 2, "U8": 1, "S8": 1, "U16": 2, "S16": 2}
_ELEMENT_BYTES = {"F16": 2, "BF16": 2, "E4M3": 1, "E5M2": 1, "TF32": 4, "S8": 1, "U8": 1}


def nvidia_tool(name: str) -> str:
    """Path of a CUDA binary tool shipped with Triton (nvdisasm, cuobjdump, ptxas)."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in Triton's backends/nvidia/bin ({path})")
    return str(path)


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin (``nvdisasm -c``: code sections only)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        run = subprocess.run([nvidia_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    if run.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {run.stderr[-2000:]}")
    return run.stdout


@dataclass
class Instruction:
    op: str          # the opcode with its modifiers, e.g. "HGMMA.64x32x16.F32.BF16"
    args: str        # the operands
    predicate: str   # "" or e.g. "@!P1"


def instructions(text: str) -> list[Instruction]:
    """The executable instructions of a SASS text, in order (``@!PT`` padding dropped)."""
    out = []
    for m in _INSTRUCTION.finditer(text):
        predicate = (m.group("pred") or "").strip()
        if predicate == "@!PT":
            continue
        out.append(Instruction(m.group("op"), m.group("args").strip(), predicate))
    return out


@dataclass
class Loop:
    label: str
    start: int   # offset of the label in the SASS text
    end: int     # offset just past the back-edge branch
    body: str

    def __len__(self) -> int:
        return self.end - self.start


def loops(sass: str) -> list[Loop]:
    """Every loop of the SASS: a branch back to an earlier label closes one, except a
    branch from after the kernel's last unpredicated EXIT to before it: ptxas places
    the retry loops of mbarrier waits there, each returning into the middle of the
    code (that is no loop: it would run from before the first wait to the end)."""
    labels = {m.group(1): m.start() for m in _LABEL.finditer(sass)}
    exits = [m.start() for m in _INSTRUCTION.finditer(sass) if m.group("op") == "EXIT" and not m.group("pred")]
    end = exits[-1] if exits else len(sass)
    found = []
    for m in _INSTRUCTION.finditer(sass):
        if not m.group("op").startswith("BRA"):
            continue
        target = _BRANCH_TARGET.search(m.group("args"))
        start = labels.get(target.group(1)) if target else None
        if start is not None and start < m.start() and not start < end < m.start():
            found.append(Loop(target.group(1), start, m.end(), sass[start:m.end()]))
    return found


def _mma_count(body: str) -> int:
    return sum(1 for i in instructions(body) if i.op.startswith(("HGMMA", "HMMA", "UTCHMMA", "UTCQMMA", "QGMMA")))


def mma_loop(sass: str) -> Loop | None:
    """The loop with the most MMA instructions (innermost on a tie); None without one."""
    candidates = [(_mma_count(loop.body), -len(loop), loop) for loop in loops(sass)]
    candidates = [c for c in candidates if c[0] > 0]
    return max(candidates, key=lambda c: (c[0], c[1]))[2] if candidates else None


def load_loop(sass: str) -> Loop | None:
    """The innermost loop with the most asynchronous tile loads (TMA or cp.async)."""
    def loads(loop):
        return sum(1 for i in instructions(loop.body) if i.op.startswith(("UTMALDG", "LDGSTS", "UBLKCP")))
    candidates = [(loads(loop), -len(loop), loop) for loop in loops(sass)]
    candidates = [c for c in candidates if c[0] > 0]
    return max(candidates, key=lambda c: (c[0], c[1]))[2] if candidates else None


def _access_bytes(op: str, default: int = 4) -> int:
    width = _WIDTH.findall(op)
    return _WIDTH_BYTES[width[-1]] if width else default


def hgmma_shape(instruction: Instruction) -> dict | None:
    """m, n, k, element size, whether A comes from registers, FLOPs and the shared-memory
    bytes the instruction reads (A: m x k unless from registers, B: n x k), of one HGMMA."""
    m = _HGMMA.match(instruction.op)
    if not m:
        return None
    rows, cols, depth = int(m.group(1)), int(m.group(2)), int(m.group(3))
    element = _ELEMENT_BYTES.get(m.group(5), 2)
    operands = [a.strip() for a in instruction.args.split(",")]
    a_in_registers = len(operands) > 1 and re.fullmatch(r"R\d+", operands[1]) is not None
    smem = cols * depth * element + (0 if a_in_registers else rows * depth * element)
    return dict(shape=f"{rows}x{cols}x{depth}", m=rows, n=cols, k=depth, a_in_registers=a_in_registers,
                flops=2 * rows * cols * depth, smem_bytes=smem)


def count(body: str) -> dict:
    """What one pass through ``body`` issues, per thread (each warp issues each
    instruction once): MMA instructions by shape, their waits and fences, tile loads,
    exponentials, barriers, shared- and local-memory accesses, and all instructions."""
    ins = instructions(body)
    c = dict(instructions=len(ins), hgmma=0, hgmma_shapes={}, hgmma_a_in_registers=0, hgmma_flops=0,
             hgmma_smem_bytes=0, hmma=0, hmma_flops=0, warpgroup_depbar=0, warpgroup_arrive=0, utmaldg=0, ldgsts=0,
             ldgsts_bytes=0, ldgdepbar=0, depbar=0, mbarrier_waits=0, mbarrier_arrives=0, mufu_ex2=0, mufu=0,
             bar_sync=0, shared_bytes=0, local_accesses=0, ldg=0, non_mma=0)
    for i in ins:
        op = i.op
        shape = hgmma_shape(i)
        if shape:
            c["hgmma"] += 1
            c["hgmma_shapes"][shape["shape"]] = c["hgmma_shapes"].get(shape["shape"], 0) + 1
            c["hgmma_a_in_registers"] += shape["a_in_registers"]
            c["hgmma_flops"] += shape["flops"]
            c["hgmma_smem_bytes"] += shape["smem_bytes"]
            continue
        if op.startswith("WARPGROUP.DEPBAR"):
            c["warpgroup_depbar"] += 1
        elif op.startswith("WARPGROUP.ARRIVE"):
            c["warpgroup_arrive"] += 1
        elif not op.startswith(("HMMA", "UTCHMMA", "QGMMA")):
            c["non_mma"] += 1
        if op.startswith(("HMMA", "UTCHMMA", "QGMMA")):
            c["hmma"] += 1
            shape = _HMMA.match(op)
            c["hmma_flops"] += 2 * int(shape.group(1)) * int(shape.group(2)) * int(shape.group(3)) if shape else 0
        elif op.startswith("UTMALDG"):
            c["utmaldg"] += 1
        elif op.startswith("LDGSTS"):
            c["ldgsts"] += 1
            c["ldgsts_bytes"] += _access_bytes(op)
        elif op.startswith("LDGDEPBAR"):
            c["ldgdepbar"] += 1
        elif op.startswith("DEPBAR"):
            c["depbar"] += 1
        elif op.startswith("SYNCS") and ("TRYWAIT" in op or "PHASECHK" in op):
            c["mbarrier_waits"] += 1
        elif op.startswith("SYNCS") and "ARRIVE" in op:
            c["mbarrier_arrives"] += 1
        elif op.startswith("MUFU"):
            c["mufu"] += 1
            c["mufu_ex2"] += op.startswith("MUFU.EX2")
        elif op.startswith("BAR.SYNC") or op.startswith("BAR.RED") or op == "BAR":
            c["bar_sync"] += 1
        elif op.startswith(("LDS", "STS", "LDSM", "STSM")):
            # LDSM/STSM .x4: four 8x8 matrices of 16-bit values, 16 bytes a thread.
            c["shared_bytes"] += 16 if re.search(r"\.M88\.4\b", op) else (
                8 if re.search(r"\.M88\.2\b", op) else (4 if "M88" in op else _access_bytes(op)))
        elif op.startswith(("LDL", "STL")):
            c["local_accesses"] += 1
        elif op.startswith("LDG"):
            c["ldg"] += 1
    c["depbar_per_hgmma"] = round(c["warpgroup_depbar"] / c["hgmma"], 3) if c["hgmma"] else None
    return c


def exponentials_under_mma(body: str) -> int:
    """The exponentials (MUFU.EX2) of a loop body issued while one of its own wgmma groups
    is in flight: after an HGMMA and before the next wait for all (``WARPGROUP.DEPBAR.LE
    gsb0, 0x0``); a wait that leaves a group outstanding keeps it in flight. The body is
    read twice round, so what the end of an iteration leaves in flight counts at its top."""
    ins = instructions(body)
    in_flight, under = False, 0
    for lap in (0, 1):
        for i in ins:
            if i.op.startswith("HGMMA"):
                in_flight = True
            elif i.op.startswith("WARPGROUP.DEPBAR"):
                m = re.search(r"gsb0,\s*(0x[0-9a-f]+|\d+)", i.args)
                in_flight = bool(m and int(m.group(1), 0) > 0)
            elif i.op.startswith("MUFU.EX2"):
                under += lap == 1 and in_flight
    return under


def positions(body: str) -> dict:
    """Where in the body (instruction index) the tile loads are issued and waited for:
    the first and last load (UTMALDG / LDGSTS), the first wait on them (cp.async's
    ``DEPBAR.LE SB``, an mbarrier's ``SYNCS...TRYWAIT``), that wait's allowance of
    outstanding cp.async groups, and the body's length."""
    ins = instructions(body)
    loads = [n for n, i in enumerate(ins) if i.op.startswith(("UTMALDG", "LDGSTS", "UBLKCP"))]
    waits = [n for n, i in enumerate(ins)
             if (i.op.startswith("DEPBAR") and "SB" in i.args) or
             (i.op.startswith("SYNCS") and ("TRYWAIT" in i.op or "PHASECHK" in i.op))]
    allowance = None
    if waits and ins[waits[0]].op.startswith("DEPBAR"):
        m = re.search(r"SB\d+,\s*(0x[0-9a-f]+|\d+)", ins[waits[0]].args)
        allowance = int(m.group(1), 0) if m else 0
    return dict(length=len(ins), first_load=loads[0] if loads else None, last_load=loads[-1] if loads else None,
                first_wait=waits[0] if waits else None, outstanding_groups_allowed=allowance)
