"""What the PTX and the TTGIR of a compiled queue-pass kernel say, for
benchmarks/compiled.py: the MMA instructions and exponentials of the loop over
queue tiles, against the ideal work, and the layouts Triton gave the two dots.

Entry points: ``main_loop(ptx)``, ``loop_counts(ptx, config, block_d, gemms)``,
``dot_layouts(ttgir, config, block_d)``.
"""

from __future__ import annotations

import re

# FLOPs of one MMA instruction: (regex on the PTX, FLOPs per issue, issued by "warp" or "warpgroup").
_PRED = r"^\s*(?:@!?%p\d+\s+)?"  # an optional predicate
_MMA_SYNC = re.compile(_PRED + r"mma\.sync\.aligned\.m(\d+)n(\d+)k(\d+)", re.M)
_WGMMA = re.compile(_PRED + r"wgmma\.mma_async\.sync\.aligned\.m(\d+)n(\d+)k(\d+)", re.M)
_TCGEN05 = re.compile(_PRED + r"tcgen05\.mma\b", re.M)  # shapes live in a runtime descriptor: counted, not sized
_EX2 = re.compile(_PRED + r"ex2\.approx\.(?:ftz\.)?(f32|f16x2|bf16x2|f16|bf16)\b", re.M)
_LABEL = re.compile(r"^(\$L__\w+):", re.M)
_BRANCH = re.compile(r"^\s*(?:@!?%p\d+\s+)?bra(?:\.uni)?\s+(\$L__\w+);", re.M)


def main_loop(ptx: str) -> str:
    """The body of the PTX loop with the most MMA instructions (a backward branch
    to a label: the loop over queue tiles, software-pipelined by Triton)."""
    labels = {m.group(1): m.start() for m in _LABEL.finditer(ptx)}
    best, best_count = "", -1
    for branch in _BRANCH.finditer(ptx):
        start = labels.get(branch.group(1))
        if start is None or start >= branch.start():
            continue  # a forward branch
        body = ptx[start:branch.end()]
        count = sum(len(r.findall(body)) for r in (_MMA_SYNC, _WGMMA, _TCGEN05, _EX2))
        if count > best_count:
            best, best_count = body, count
    return best


_LAYOUT_ALIAS = re.compile(r"^(#[\w.]+) = (.+)$", re.M)
_DOT_RESULT = re.compile(r"=\s*(tt\.dot|ttng\.warp_group_dot)\s.*->\s*tensor<(\d+)x(\d+)xf32,\s*(#[\w.]+)")
_TCGEN05_OP = re.compile(r"ttng\.tc_gen5_mma\s.*?:\s*(.*)$")
_MEMDESC = re.compile(r"!ttg\.memdesc<(\d+)x(\d+)x\w+,\s*(#[\w.]+)")


def _layout_name(definition: str) -> str:
    """A layout's short description: warpsPerCTA (and the MMA version), or a tensor-memory block."""
    warps = re.search(r"warpsPerCTA = \[([\d, ]+)\]", definition)
    if "tensor_memory_encoding" in definition:
        block = re.search(r"blockM = (\d+), blockN = (\d+)", definition)
        return f"tmem {block.group(1)}x{block.group(2)}" if block else "tmem"
    kind = "mma v" + re.search(r"versionMajor = (\d+)", definition).group(1) if "nvidia_mma" in definition \
        else definition.split("<")[0].lstrip("#")
    return f"{kind} [{warps.group(1)}]" if warps else kind


def dot_layouts(ttgir: str, config, block_d: int) -> dict:
    """The layouts of the queue pass's dots in the TTGIR: the first dot (the cosines
    q W^T, result [BLOCK_M, BLOCK_K]) and the second (P W, [BLOCK_M, BLOCK_D]); each
    its warpsPerCTA (and the layout's kind), or None without that dot. Pipelining
    may peel copies of a dot; all copies must agree (else the layouts are listed)."""
    aliases = {m.group(1): m.group(2) for m in _LAYOUT_ALIAS.finditer(ttgir)}
    found = {"first": [], "second": []}
    warps = {"first": [], "second": []}
    for line in ttgir.splitlines():
        dot = _DOT_RESULT.search(line)
        if dot:
            shape, layout = (int(dot.group(2)), int(dot.group(3))), dot.group(4)
        else:
            tcgen05 = _TCGEN05_OP.search(line)
            descs = _MEMDESC.findall(tcgen05.group(1)) if tcgen05 else []
            if len(descs) < 3:
                continue
            shape, layout = (int(descs[2][0]), int(descs[2][1])), descs[2][2]  # the accumulator's
        definition = aliases.get(layout, layout)
        which = "first" if shape == (config.block_m, config.block_k) and \
            (config.block_k != block_d or not found["first"]) else "second"
        name = _layout_name(definition)
        if name not in found[which]:
            found[which].append(name)
            match = re.search(r"warpsPerCTA = \[([\d, ]+)\]", definition)
            warps[which].append([int(n) for n in match.group(1).split(",")] if match else None)
    out = {}
    for which in ("first", "second"):
        out[f"{which}_dot_layout"] = " | ".join(found[which]) or None
        out[f"{which}_dot_warps_per_cta"] = warps[which][0] if len(warps[which]) == 1 else None
    return out


def loop_counts(ptx: str, config, block_d: int, gemms: int) -> dict:
    """MMA FLOPs and exponentials per loop iteration, relative to the ideal
    (``gemms`` GEMMs of BLOCK_M x BLOCK_K x D, each done once; one exponential per logit)."""
    body = main_loop(ptx)
    warps = config.num_warps
    flops, instructions, kinds = 0, 0, set()
    for m, n, k in _MMA_SYNC.findall(body):  # one per warp
        flops += 2 * int(m) * int(n) * int(k) * warps
        instructions += 1
        kinds.add(f"mma.sync m{m}n{n}k{k}")
    for m, n, k in _WGMMA.findall(body):  # one per warpgroup (4 warps)
        flops += 2 * int(m) * int(n) * int(k) * max(1, warps // 4)
        instructions += 1
        kinds.add(f"wgmma m{m}n{n}k{k}")
    tcgen05 = len(_TCGEN05.findall(body))
    if tcgen05:
        instructions += tcgen05
        kinds.add("tcgen05.mma")
    exps = 0
    for kind in _EX2.findall(body):  # per thread; packed forms hold two
        exps += (2 if kind.endswith("x2") else 1) * 32 * warps
    ideal = gemms * (2 * config.block_m * config.block_k * block_d)
    logits = config.block_m * config.block_k
    return dict(mma_instructions_per_iteration=instructions, mma_kinds=sorted(kinds),
                mma_flops_over_ideal=round(flops / ideal, 3) if flops and not tcgen05 else None,
                exponentials_per_logit=round(exps / logits, 3) if body else None)
