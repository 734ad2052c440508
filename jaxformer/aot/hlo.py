"""Reading a compiled program's HLO text: loops with their trip counts, matmul FLOPs, bytes
moved by each collective and an estimate of HBM traffic.

XLA's own ``cost_analysis()`` counts the body of a ``while`` loop once, so for a model with
scanned layers its FLOPs and bytes are those of one layer plus the rest. Here every
computation gets a multiplier: 1 for the entry, and for a loop body the caller's multiplier
times the loop's trip count (``known_trip_count`` when XLA recorded it, else the constant the
loop condition compares the counter with), so scanned layers and gradient accumulation count
in full.

* FLOPs: ``2 · prod(output) · prod(contracted dims)`` of every ``dot``; read from the
  *unoptimized* HLO (``lowered.as_text(dialect="hlo")``), where matmuls are still dots (a TPU
  compiler turns them into convolutions). That program is the global one, before partitioning:
  divide by the device count for one device's share. Custom kernels (Pallas) are not counted.
* Collectives: per device, the bytes a ring algorithm puts on the wire for a group of ``n``
  devices: all-gather ``out·(n-1)/n``, reduce-scatter ``in·(n-1)/n``, all-reduce
  ``2·size·(n-1)/n``, all-to-all ``size·(n-1)/n``, collective-permute ``size``. Read from the
  *compiled* (partitioned) HLO.
* HBM traffic: for every instruction the program runs (not those inside a fusion, which live
  in registers and on-chip memory), its output bytes plus its operands' bytes; a model of
  what XLA's "bytes accessed" counts, with loops counted in full. Arrays whose layout puts
  them in another memory space than HBM (``S(1)``: the TPU's on-chip VMEM, where XLA's memory
  space assignment prefetches operands and keeps results; ``S(2)``: scalar memory) move no HBM
  bytes: a prefetch (``copy-start``, async ``slice-start``) reads HBM once, and the fusions that
  use the prefetched copy read it on chip.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "s4": 0.5, "u4": 0.5, "s2": 0.25, "u2": 0.25, "token": 0}
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
# An array with its layout: "bf16[8,128]{1,0:T(8,128)(2,1)S(1)}" (S(n): memory space n; none: HBM)
_ARRAY_LAYOUT = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\](\{[^{}]*\})?")
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")
_CALLEE = re.compile(r"\b(calls|to_apply|body|condition)=%?([\w.\-]+)")
# A computation's first line: "%name (params) -> shape {", or bare "name {" in JAX's text of
# the unoptimized program.
_BARE_HEADER = re.compile(r"^(ENTRY\s+)?%?[\w.\-]+\s*\{\s*$")
_CALLEE_LIST = re.compile(r"\b(called_computations|branch_computations)=\{([^}]*)\}")
# Instructions that move no data of their own (views, tuples, control flow, bookkeeping).
_NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
               "conditional", "call", "after-all", "partition-id", "replica-id", "iota",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done",
               "async-done", "send-done", "recv-done", "opt-barrier", "slice-done"}


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # "bf16[4,48]{1,0}" or a tuple "(f32[], ...)"
    opcode: str
    operands: list[str]
    operand_text: str  # what the parentheses hold: operand names, or a constant's value
    attrs: str  # everything after the operand list

    @property
    def bytes(self) -> float:
        return shape_bytes(self.shape)


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]
    entry: bool = False

    def shapes(self) -> dict[str, str]:
        return {i.name: i.shape for i in self.instructions}


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape (a tuple: the sum of its arrays), wherever they live."""
    return _arrays_bytes(shape, hbm_only=False)


def hbm_shape_bytes(shape: str) -> float:
    """Bytes of the arrays of an HLO shape that live in HBM: those whose layout names no other
    memory space (``S(1)`` on-chip VMEM, ``S(2)`` scalar memory)."""
    return _arrays_bytes(shape, hbm_only=True)


def _arrays_bytes(shape: str, hbm_only: bool) -> float:
    total = 0.0
    for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape):
        space = _MEMORY_SPACE.search(layout)
        if dtype not in _DTYPE_BYTES or (hbm_only and space and space.group(1) != "0"):
            continue
        total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def array_dims(shape: str) -> list[int]:
    """Dimensions of an array shape: "bf16[4,48]{1,0}" -> [4, 48]."""
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def parse_module(text: str) -> list[Computation]:
    """The computations of an HLO module's text, in the order printed (callees first)."""
    comps: list[Computation] = []
    current: Computation | None = None
    pending: list[str] = []  # one instruction's text (a kernel's config can span lines)

    def flush() -> None:
        if current is not None and pending:
            inst = _parse_instruction(" ".join(pending).strip())
            if inst is not None:
                current.instructions.append(inst)
        pending.clear()

    for line in text.splitlines():
        if not line.strip() or line.startswith(("HloModule", "//")):
            continue
        if line.strip() == "}" and not line[0].isspace():
            flush()
            current = None
        elif not line[0].isspace() and line.rstrip().endswith("{") and (
                " -> " in line or _BARE_HEADER.match(line)):
            flush()
            head = line.split()
            entry = head[0] == "ENTRY"
            current = Computation((head[1] if entry else head[0]).lstrip("%"), [], entry)
            comps.append(current)
        elif line[0].isspace():
            flush()
            pending.append(line)
        else:  # the rest of the instruction above
            pending.append(line)
    flush()
    return comps


def _parse_instruction(line: str) -> Instruction | None:
    if line.startswith("ROOT "):
        line = line[5:]
    name, sep, rest = line.partition(" = ")
    if not sep:
        return None
    if rest.startswith("("):
        end = _matching(rest, 0)
        shape, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode, paren, rest = rest.partition("(")
    if not paren:
        return None
    end = _matching("(" + rest, 0)
    operand_text, attrs = rest[:end - 1], rest[end:]
    # Operands print as "%name", "name" (JAX's unoptimized text) or "f32[2]{0} %name".
    operands = [item.split()[-1].lstrip("%") for item in _split_top(operand_text)
                if item.strip()]
    return Instruction(name.lstrip("%"), shape, opcode.strip(), operands, operand_text, attrs)


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside any brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _matching(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(text) - 1


def callees(inst: Instruction) -> Iterator[tuple[str, str]]:
    """(edge kind, computation name) of every computation ``inst`` calls."""
    for kind, name in _CALLEE.findall(inst.attrs):
        yield kind, name
    for kind, names in _CALLEE_LIST.findall(inst.attrs):
        for name in re.findall(r"%?([\w.\-]+)", names):
            yield kind, name


def trip_count(inst: Instruction, comps: dict[str, Computation]) -> int | None:
    """Iterations of a ``while``: XLA's known_trip_count, else N from a condition that
    compares the counter with the constant N (direction LT, counter from 0); None if neither."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', inst.attrs)
    if m:
        return int(m.group(1))
    cond = next((c for kind, c in callees(inst) if kind == "condition"), None)
    if cond is None or cond not in comps:
        return None
    body = comps[cond].instructions
    constants = {i.name: int(i.operand_text) for i in body
                 if i.opcode == "constant" and re.fullmatch(r"-?\d+", i.operand_text.strip())}
    for i in body:
        if i.opcode == "compare" and "direction=LT" in i.attrs:
            for op in i.operands:
                if op in constants:
                    return constants[op]
    return None


def multipliers(comps: list[Computation]) -> tuple[dict[str, float], list[str]]:
    """{computation: times it runs per call of the entry}, and the loops whose trip count was
    not found (counted once)."""
    by_name = {c.name: c for c in comps}
    mult: dict[str, float] = {c.name: 0.0 for c in comps}
    unknown: list[str] = []
    for comp in comps:
        if comp.entry:
            mult[comp.name] = 1.0
    for comp in reversed(comps):  # callers are printed after their callees
        m = mult[comp.name]
        if not m:
            continue
        for inst in comp.instructions:
            factor = 1.0
            if inst.opcode == "while":
                n = trip_count(inst, by_name)
                if n is None:
                    unknown.append(inst.name)
                factor = float(n or 1)
            for _, callee in callees(inst):
                if callee in mult:
                    mult[callee] += m * factor
    return mult, unknown


def _executed(comps: list[Computation]) -> set[str]:
    """Computations that run as programs (entry, loop bodies and conditions, branches, called
    subroutines), as opposed to fusion bodies and reducers."""
    by_name = {c.name: c for c in comps}
    run = {c.name for c in comps if c.entry}
    stack = list(run)
    while stack:
        for inst in by_name[stack.pop()].instructions:
            for kind, callee in callees(inst):
                control = (inst.opcode in ("while", "conditional")
                           or (inst.opcode == "call" and kind == "to_apply"))
                if control and callee in by_name and callee not in run:
                    run.add(callee)
                    stack.append(callee)
    return run


def dot_flops(text: str) -> tuple[float, list[str]]:
    """FLOPs of every dot in an HLO module (loops times their trip counts), and the loops whose
    trip count was not found."""
    comps = parse_module(text)
    mult, unknown = multipliers(comps)
    total = 0.0
    for m, shapes, _, inst in _weighted(comps, mult):
        if inst.opcode == "dot":
            lhs = array_dims(shapes.get(inst.operands[0], "")) if inst.operands else []
            contract = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst.attrs)
            k = math.prod(lhs[int(d)] for d in contract.group(1).split(",") if d) if (
                contract and lhs) else 1
            total += m * 2.0 * math.prod(array_dims(inst.shape)) * k
    return total, unknown


def _weighted(comps: list[Computation], mult: dict[str, float], only: set[str] | None = None
              ) -> Iterator[tuple[float, dict[str, str], Computation, Instruction]]:
    """(multiplier, the computation's shapes by name, computation, instruction) of every
    instruction in a computation that runs (in ``only``, when given)."""
    for comp in comps:
        if not mult[comp.name] or (only is not None and comp.name not in only):
            continue
        shapes = comp.shapes()
        for inst in comp.instructions:
            yield mult[comp.name], shapes, comp, inst


def _group_size(attrs: str, n_devices: int) -> int:
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
    if m:
        return max(1, len([x for x in m.group(1).split(",") if x]))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
    if m:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
        names = re.findall(r"'([^']+)'", m.group(2))
        return math.prod(int(sizes.get(n, 1)) for n in names) or 1
    return n_devices


def collective_bytes(text: str, n_devices: int) -> dict[str, float]:
    """Per-device wire bytes of each collective kind (see the module docstring), loops counted
    with their trip counts. ``text``: the compiled (partitioned) module."""
    comps = parse_module(text)
    mult, _ = multipliers(comps)
    out = {kind: 0.0 for kind in COLLECTIVES}
    for m, shapes, comp, inst in _weighted(comps, mult):
        kind = inst.opcode.removesuffix("-start")
        if kind not in out:
            continue
        n = _group_size(inst.attrs, n_devices)
        if kind == "all-reduce" and comp.name.startswith("all-reduce-scatter"):
            # A TPU reduce-scatter: an all-reduce whose result each device slices, fused
            # and run as a reduce-scatter (input bytes * (n-1)/n on the wire).
            out["reduce-scatter"] += m * inst.bytes * (n - 1) / n
        elif kind == "collective-permute":
            out[kind] += m * _largest_array(inst.shape)
        elif n > 1:
            if kind == "reduce-scatter":
                size = sum(shape_bytes(shapes.get(op, "")) for op in inst.operands)
            else:
                size = _largest_array(inst.shape)
            out[kind] += m * size * (n - 1) / n * (2.0 if kind == "all-reduce" else 1.0)
    return out


def _largest_array(shape: str) -> float:
    """Bytes of the largest array in a shape (an async start's tuple holds input and output)."""
    sizes = [shape_bytes(f"{d}[{dims}]") for d, dims in _ARRAY.findall(shape)]
    return max(sizes, default=0.0)


def hbm_bytes(text: str) -> float:
    """Estimated bytes read and written in device memory per run (see the module docstring).

    Slicing reads only the slice: an operand a fusion only slices (``dynamic-slice``,
    ``slice``, ``gather``: one layer's weights out of a scanned stack) counts the slices' bytes,
    and an in-place ``dynamic-update-slice`` (a layer's gradient into the stack) counts the
    update's bytes, not the whole buffer's. Arrays in on-chip memory spaces count nothing.
    """
    comps = parse_module(text)
    by_name = {c.name: c for c in comps}
    mult, _ = multipliers(comps)
    run = _executed(comps)
    total = 0.0
    for m, shapes, _, inst in _weighted(comps, mult, only=run):
        if inst.opcode in _NO_TRAFFIC:
            continue
        operands = [hbm_shape_bytes(shapes.get(op, "")) for op in inst.operands]
        out = hbm_shape_bytes(inst.shape)
        if inst.opcode in ("copy-start", "slice-start"):
            # (source or its tuple, destination, context): the destination's bytes come from
            # the source; HBM is read when the source is in HBM, written when the destination is
            parts = _split_top(inst.shape.strip()[1:-1])
            dest = parts[1] if inst.opcode == "slice-start" else parts[0]
            read = shape_bytes(dest) if any(operands) else 0.0
            operands, out = [read], hbm_shape_bytes(dest)
        elif inst.opcode == "dynamic-slice":
            operands = [out if operands and operands[0] else 0.0]
        elif inst.opcode == "dynamic-update-slice" and len(operands) > 1:
            operands, out = [operands[1]], operands[1]
        elif inst.opcode == "fusion":
            body = next((by_name[c] for k, c in callees(inst) if k == "calls"
                         and c in by_name), None)
            if body is not None:
                operands, out = _fusion_traffic(body, operands, out)
        total += m * (out + sum(operands))
    return total


_SLICING = ("dynamic-slice", "slice", "gather")


def _fusion_traffic(body: Computation, operands: list[float], out: float
                    ) -> tuple[list[float], float]:
    """(bytes read per operand, bytes written) of a fusion whose body is ``body``; operands
    and out are the HBM bytes of the operands and output (0 for those on chip)."""
    params = {}
    for inst in body.instructions:
        if inst.opcode == "parameter":
            m = re.match(r"\s*(\d+)", inst.operand_text)
            if m:
                params[inst.name] = int(m.group(1))
    users: dict[str, list[Instruction]] = {name: [] for name in params}
    for inst in body.instructions:
        for pos, op in enumerate(inst.operands):
            if op in users:
                users[op].append((inst, pos))
    reads = list(operands)
    for name, index in params.items():
        used = users[name]
        if index >= len(reads) or not used:
            continue
        if reads[index] and all(u.opcode in _SLICING and pos == 0 for u, pos in used):
            reads[index] = sum(u.bytes for u, _ in used)
        elif all(u.opcode == "dynamic-update-slice" and pos == 0 for u, pos in used):
            reads[index] = 0.0  # the buffer updated in place
    root = body.instructions[-1] if body.instructions else None
    if (out and root is not None and root.opcode == "dynamic-update-slice"
            and len(root.operands) > 1):
        out = shape_bytes(body.shapes().get(root.operands[1], root.shape))
    return reads, out


