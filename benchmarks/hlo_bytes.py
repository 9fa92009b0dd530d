"""Row-aware bytes accessed of a compiled XLA program, from its optimized HLO text.

XLA's ``compiled.cost_analysis()["bytes accessed"]`` charges a gather or a scatter with its whole
operand: a gather of 26k rows out of a 1M x 64 table is charged 256 MB, although it reads only the
26k rows, and an in-place scatter into a donated table writes only the rows it updates. For an
embedding step, whose tables are mostly untouched, that count says nothing about the memory
traffic. ``row_aware_bytes`` walks ``compiled.as_text()`` and charges each instruction of the entry
computation with the bytes it reads and writes, with these rules:

* most instructions: every operand read in full, the output written in full;
* free: ``parameter``, ``constant``, ``bitcast``, ``tuple``, ``get-tuple-element``,
  ``opt-barrier``, ``after-all``, ``partition-id``, ``replica-id`` (no data moves);
* ``gather`` / ``dynamic-slice`` / ``slice``: the operand is charged at the size of the output (the
  rows read), plus the indices, plus the output written;
* ``scatter`` / ``dynamic-update-slice`` (in place, as XLA runs them when the operand's buffer can
  be reused; when it cannot, XLA inserts a ``copy``, which is charged in full): the indices and
  updates read, the updated rows written, and the updated rows read too when the scatter combines
  (``to_apply`` is not a plain overwrite);
* a fusion: its parameters read and its outputs written, with the same rules inside: a parameter
  consumed only by gathers / slices / scatter operands (through bitcasts and reshapes) is charged
  at the gathered size, and an output that is a scatter or a dynamic-update-slice at the updated
  rows;
* ``copy`` (of a whole table, say): read and written in full, so a table copy shows up;
  an asynchronous ``copy-start`` / ``slice-start`` (TPU): its target read from the operand and
  written, once (its ``-done`` and the operand aliased in its output tuple are free);
* ``conditional``: the costliest branch; ``while``: its body and condition times the known trip
  count (XLA's ``known_trip_count``, else ``counter < constant`` read from its condition, as TPU
  programs carry it; when neither, a loop whose bound is computed at run time, the caller's
  ``unknown_trips``, default 1; ``while_trip_counts_unknown`` counts those loops); ``call``: the
  callee; a fusion nested in a fusion (TPU's): what its own parameters and outputs say.

``naive_bytes`` is the same walk charging every operand and output in full (close to XLA's own
figure), so the two can be compared instruction by instruction.

``device_memory_only=True`` charges only what moves to and from device memory (HBM): a value
whose layout places it in another memory space (``S(1)`` and up: on TPU, the on-chip memory the
compiler's memory-space assignment fills) is read and written for free. On CPU, where XLA
places nothing, both counts agree.

Command line: ``python benchmarks/hlo_bytes.py module.txt`` prints the totals and the top
instructions of a saved ``compiled.as_text()``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from typing import Any

DTYPE_BYTES = {
    "pred": 1,
    "s2": 1,
    "u2": 1,
    "s4": 1,
    "u4": 1,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
    "token": 0,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_NAME = r"%?[\w.\-]+"
_HEADER = re.compile(r"^(ENTRY\s+)?(%?[\w.\-]+)\s*\((.*)\)\s*->\s*(.*)\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?(%?[\w.\-]+)\s*=\s*(.*)$")

FREE = {
    "parameter",
    "constant",
    "bitcast",
    "tuple",
    "get-tuple-element",
    "opt-barrier",
    "after-all",
    "partition-id",
    "replica-id",
}
VIEWS = {"bitcast", "reshape"}  # inside a fusion: the same data, no pass of its own
ROW_READS = {"gather", "dynamic-slice", "slice"}  # read operand 0 only where the output says
ROW_WRITES = {"scatter", "dynamic-update-slice"}  # write operand 0 only where the updates say
ASYNC_READS = {"copy-start", "slice-start"}  # asynchronous copy / slice of operand 0 (TPU)
ASYNC_DONE = {"copy-done", "slice-done"}


def shape_bytes(type_str: str) -> int:
    """Bytes of an HLO type string (an array type or a tuple of them)."""
    total = 0
    for dtype, dims in _ARRAY.findall(type_str):
        if dtype not in DTYPE_BYTES:
            continue
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * DTYPE_BYTES[dtype]
    return total


_SPACE = re.compile(r"S\((\d+)\)")


def _elements(type_str: str) -> list[str]:
    """The array types of a type string: its elements if it is a tuple, else itself."""
    t = type_str.strip()
    return [e.strip() for e in _split_top(t[1:-1])] if t.startswith("(") else [t]


def _on_chip(array_type: str) -> bool:
    """Whether an array type's layout places it in a memory space other than the default
    (``S(1)``, ...: on TPU, the on-chip memory that XLA's memory-space assignment fills)."""
    layout = array_type[array_type.find("]") :]
    m = _SPACE.search(layout)
    return bool(m and int(m.group(1)))


def device_memory_bytes(type_str: str) -> int:
    """Bytes of the arrays of an HLO type string that live in the default memory space (device
    memory: HBM), those placed on chip (``S(1)`` and up) left out."""
    return sum(shape_bytes(e) for e in _elements(type_str) if not _on_chip(e))


def _balanced(s: str, start: int) -> int:
    """Index just past the bracket group opening at ``s[start]``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(s)):
        c = s[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return len(s)


def _bare(name: str) -> str:
    return name.lstrip("%")


@dataclasses.dataclass
class Instr:
    name: str
    type: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool = False
    param_index: int = -1
    literal: str = ""  # a constant's value as written

    @property
    def bytes(self) -> int:
        return shape_bytes(self.type)

    def attr_computations(self, key: str) -> list[str]:
        m = re.search(rf"\b{key}=(\{{[^}}]*\}}|{_NAME})", self.attrs)
        if not m:
            return []
        return [_bare(n) for n in re.findall(_NAME, m.group(1).strip("{}"))]

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""


@dataclasses.dataclass
class Computation:
    name: str
    instrs: dict[str, Instr]
    order: list[str]
    params: list[str]  # instruction names of parameter(0), parameter(1), ...
    root: str
    entry: bool = False

    def users(self) -> dict[str, list[Instr]]:
        out: dict[str, list[Instr]] = {n: [] for n in self.instrs}
        for ins in self.instrs.values():
            for op in ins.operands:
                if op in out:
                    out[op].append(ins)
        return out


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    root, name, rest = m.group(1), _bare(m.group(2)), m.group(3).strip()
    if rest.startswith("("):
        end = _balanced(rest, 0)
        type_str, rest = rest[:end], rest[end:].strip()
    else:
        type_str, _, rest = rest.partition(" ")
    # a layout ``{1,0}`` follows the dims without a space; skip anything up to the opcode
    m2 = re.match(r"([a-z][\w\-]*)\(", rest)
    if not m2:
        return None
    opcode = m2.group(1)
    end = _balanced(rest, m2.end() - 1)
    operand_str, attrs = rest[m2.end() : end - 1], rest[end:]
    operands = []
    if opcode not in ("parameter", "constant"):
        for part in _split_top(operand_str):
            names = re.findall(r"%[\w.\-]+", part) or re.findall(r"([\w.\-]+)\s*$", part)
            if names:
                operands.append(_bare(names[-1]))
    index = int(operand_str) if opcode == "parameter" and operand_str.strip().isdigit() else -1
    literal = operand_str.strip() if opcode == "constant" else ""
    return Instr(name, type_str, opcode, operands, attrs, bool(root), index, literal)


def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return parts


def parse_module(text: str) -> dict[str, Computation]:
    """The computations of an HLO module's text, by name."""
    comps: dict[str, Computation] = {}
    cur: Computation | None = None
    for line in text.splitlines():
        if cur is None:
            m = _HEADER.match(line.strip())
            if m and not line.startswith(" "):
                cur = Computation(_bare(m.group(2)), {}, [], [], "", bool(m.group(1)))
            continue
        if line.strip() == "}":
            comps[cur.name] = cur
            cur = None
            continue
        ins = _parse_instr(line)
        if ins is None:
            continue
        cur.instrs[ins.name] = ins
        cur.order.append(ins.name)
        if ins.root:
            cur.root = ins.name
        if ins.param_index >= 0:
            while len(cur.params) <= ins.param_index:
                cur.params.append("")
            cur.params[ins.param_index] = ins.name
    if cur is not None:  # unterminated last computation
        comps[cur.name] = cur
    return comps


def _combines(comps: dict[str, Computation], ins: Instr) -> bool:
    """Whether a scatter's ``to_apply`` reads the old value (anything but ``return update``)."""
    names = ins.attr_computations("to_apply")
    if not names or names[0] not in comps:
        return True
    comp = comps[names[0]]
    root = comp.instrs.get(comp.root)
    if root is None:
        return True
    last = [p for p in comp.params if p]
    updates = last[len(last) // 2 :]

    def source(name: str) -> str:  # through bitcasts (TPU writes ``return bitcast(update)``)
        ins = comp.instrs.get(name)
        while ins is not None and ins.opcode in VIEWS and ins.operands:
            name, ins = ins.operands[0], comp.instrs.get(ins.operands[0])
        return name

    outputs = root.operands if root.opcode == "tuple" else [root.name]
    return any(source(o) not in updates for o in outputs)


def _scatter_rows(comps: dict[str, Computation], comp: Computation, ins: Instr) -> tuple[int, int]:
    """(bytes of operand rows read, bytes written) of an in-place scatter / DUS."""
    if ins.opcode == "dynamic-update-slice":
        upd = comp.instrs[ins.operands[1]].bytes if ins.operands[1] in comp.instrs else 0
        return 0, upd
    n = len(ins.operands) // 2  # operands..., indices, updates... (variadic scatter)
    upd = sum(comp.instrs[o].bytes for o in ins.operands[n + 1 :] if o in comp.instrs)
    rows = min(upd, ins.bytes)  # duplicate indices touch a row more than once, not more rows
    return (rows if _combines(comps, ins) else 0), rows


def _topological(comp: Computation) -> list[str]:
    """The instructions reachable from the root, every operand before its users."""
    seen: set[str] = set()
    order: list[str] = []
    stack: list[tuple[str, bool]] = [(comp.root, False)]
    while stack:
        name, done = stack.pop()
        if done:
            order.append(name)
            continue
        if name in seen or name not in comp.instrs:
            continue
        seen.add(name)
        stack.append((name, True))
        stack.extend((o, False) for o in comp.instrs[name].operands if o not in seen)
    return order


def demanded_bytes(comps: dict[str, Computation], comp: Computation) -> dict[str, float]:
    """Bytes of each instruction of fused computation ``comp`` that computing its outputs reads.

    Demand flows from the root to the parameters, as XLA's loop emitter computes each output
    element from the operand elements it needs: elementwise ops, broadcasts, transposes, copies
    and reductions pass on the same fraction of each operand; ``slice`` / ``gather`` /
    ``dynamic-slice`` demand only the elements they return (their indices in full); an in-place
    ``scatter`` demands the updated rows of its operand when it combines, its indices and updates
    in full; ``dynamic-update-slice`` its update. Row reads by several users add up (distinct
    rows); other uses of one value count once (the largest).
    """
    row_sum: dict[str, float] = {}
    elem_max: dict[str, float] = {}

    def need(name: str, nbytes: float, rows: bool = False) -> None:
        if rows:
            row_sum[name] = row_sum.get(name, 0.0) + nbytes
        else:
            elem_max[name] = max(elem_max.get(name, 0.0), nbytes)

    def demand(name: str) -> float:
        full = comp.instrs[name].bytes
        return min(full, row_sum.get(name, 0.0) + elem_max.get(name, 0.0))

    root = comp.instrs[comp.root]
    if root.opcode == "tuple":
        for o in root.operands:
            need(o, comp.instrs[o].bytes)
    need(comp.root, root.bytes)
    out: dict[str, float] = {}
    for name in reversed(_topological(comp)):
        ins = comp.instrs[name]
        d = out[name] = demand(name)
        if not d or ins.opcode == "parameter":
            continue
        frac = d / ins.bytes if ins.bytes else 1.0
        ops = [o for o in ins.operands if o in comp.instrs]
        if ins.opcode in ROW_READS and ops:
            need(ops[0], d, rows=True)
            for o in ops[1:]:
                need(o, frac * comp.instrs[o].bytes)
        elif ins.opcode in ROW_WRITES and ops:
            read, _ = _scatter_rows(comps, comp, ins)
            need(ops[0], read, rows=True)
            for o in ops[1:]:
                need(o, comp.instrs[o].bytes)
        elif ins.opcode == "tuple":
            continue  # the root tuple's operands were demanded above
        elif ins.opcode == "fusion" and _callee(comps, ins) is not None:
            inner = _callee(comps, ins)
            assert inner is not None
            sub = demanded_bytes(comps, inner)  # a fusion nested in this one (TPU's kCustom)
            for o, p in zip(ins.operands, inner.params, strict=False):
                if o in comp.instrs and p:
                    need(o, frac * sub.get(p, 0.0))
        else:
            for o in ops:
                need(o, frac * comp.instrs[o].bytes)
    return out


def _output_written(comps, comp: Computation, name: str) -> int:
    """Bytes the value ``name`` of ``comp`` writes as an output (row-aware for scatters)."""
    ins = comp.instrs[name]
    while ins.opcode in VIEWS and ins.operands[0] in comp.instrs:
        ins = comp.instrs[ins.operands[0]]
    if ins.opcode == "tuple":
        return sum(_output_written(comps, comp, o) for o in ins.operands if o in comp.instrs)
    if ins.opcode in ROW_WRITES:
        return _scatter_rows(comps, comp, ins)[1]
    inner = _callee(comps, ins) if ins.opcode == "fusion" else None
    if inner is not None:  # a nested fusion: its own root says what it writes
        return _output_written(comps, inner, inner.root)
    return comp.instrs[name].bytes


def _callee(comps: dict[str, Computation], ins: Instr) -> Computation | None:
    """The computation a fusion calls, if the module has it."""
    return comps.get((ins.attr_computations("calls") or [""])[0])


def _trips(comps: dict[str, Computation], comp: Computation, ins: Instr) -> int | None:
    """The trips of a ``while``: XLA's ``known_trip_count``, else ``_counted_trips``."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
    return int(m.group(1)) if m else _counted_trips(comps, comp, ins)


def _counted_trips(comps: dict[str, Computation], comp: Computation, ins: Instr) -> int | None:
    """The trips of a ``while`` whose condition is ``counter < constant`` with the counter
    starting from a constant (a loop with a static bound, where XLA gives no
    ``known_trip_count``, as on TPU); None if it is not such a loop."""
    cond = comps.get((ins.attr_computations("condition") or [""])[0])
    init = comp.instrs.get(ins.operands[0]) if ins.operands else None
    if cond is None or init is None or init.opcode != "tuple":
        return None
    root = cond.instrs.get(cond.root)
    if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs:
        return None
    counter, bound = (cond.instrs.get(o) for o in root.operands[:2])
    if counter is None or bound is None or counter.opcode != "get-tuple-element":
        return None
    index = re.search(r"index=(\d+)", counter.attrs)
    start = comp.instrs.get(init.operands[int(index.group(1))]) if index else None
    while start is not None and start.opcode in (*VIEWS, "copy") and start.operands:
        start = comp.instrs.get(start.operands[0])
    values = [_constant(c) for c in (start, bound)]
    if values[0] is None or values[1] is None:
        return None
    return max(values[1] - values[0], 0)


def _constant(ins: Instr | None) -> int | None:
    """The value of a scalar integer ``constant``, else None."""
    if ins is None or ins.opcode != "constant":
        return None
    return int(ins.literal) if re.fullmatch(r"-?\d+", ins.literal) else None


@dataclasses.dataclass
class Charge:
    name: str
    opcode: str
    op_name: str
    bytes: int
    naive: int
    detail: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Counter:
    """Row-aware and naive byte counts of a parsed module."""

    def __init__(self, text: str, unknown_trips: int = 1, device_memory_only: bool = False):
        self.comps = parse_module(text)
        self.unknown_trips = unknown_trips  # charged to each loop XLA has no count for
        self.device_memory_only = device_memory_only  # leave out what moves in on-chip memory
        entries = [c for c in self.comps.values() if c.entry]
        if len(entries) != 1:
            raise ValueError(f"expected one ENTRY computation, found {len(entries)}")
        self.entry = entries[0]
        self.unknown_loops = 0

    def _operand_bytes(self, comp: Computation, ins: Instr) -> int:
        return sum(comp.instrs[o].bytes for o in ins.operands if o in comp.instrs)

    def _kept(self, value: Instr, nbytes: float) -> float:
        """``nbytes`` read from or written to ``value``, or its share in device memory where
        only that is counted (none of it for a value on chip)."""
        if not self.device_memory_only or not value.bytes:
            return nbytes
        return nbytes * device_memory_bytes(value.type) / value.bytes

    def _kept_operands(self, comp: Computation, names: list[str]) -> float:
        values = [comp.instrs[o] for o in names if o in comp.instrs]
        return sum(self._kept(v, v.bytes) for v in values)

    def charge(self, comp: Computation, ins: Instr) -> tuple[int, int, dict[str, Any]]:
        """(row-aware bytes, naive bytes, detail) of one instruction of ``comp``."""
        op = ins.opcode
        naive = self._operand_bytes(comp, ins) + ins.bytes
        if op in FREE:
            return 0, 0, {}
        if op in ("fusion",):
            return self._fusion(comp, ins, naive)
        rest = self._kept_operands(comp, ins.operands[1:])
        source = comp.instrs.get(ins.operands[0]) if ins.operands else None
        if op in ROW_READS and source is not None:
            moved = self._kept(source, ins.bytes) + self._kept(ins, ins.bytes) + rest
            return round(moved), naive, {"rows": ins.bytes}
        if op in ROW_WRITES:
            read, written = _scatter_rows(self.comps, comp, ins)
            return round(self._kept(ins, read + written) + rest), naive, {"rows_written": written}
        if op in ASYNC_READS and source is not None:
            # ``(target, ...)`` or ``((operand), target, ...)``: the target's bytes are read
            # from the operand and written to the target; the operand in the tuple is an alias
            target = next(e for e in _elements(ins.type) if _dims(e))
            size = shape_bytes(target)
            written = device_memory_bytes(target) if self.device_memory_only else size
            return round(self._kept(source, size) + written), naive, {}
        if op in ASYNC_DONE:  # the end of an ASYNC_READS start, which was charged
            return 0, naive, {}
        if op == "conditional":
            branches = ins.attr_computations("branch_computations")
            if not branches:
                branches = ins.attr_computations("true_computation") + ins.attr_computations(
                    "false_computation"
                )
            costs = [self.computation(self.comps[b]) for b in branches if b in self.comps]
            best = max(costs, key=lambda c: c[0], default=(0, 0, []))
            return best[0], best[1], {"branches": len(costs)}
        if op == "while":
            counted = _trips(self.comps, comp, ins)
            trips = counted if counted is not None else self.unknown_trips
            if counted is None:
                self.unknown_loops += 1
            total = naive_total = 0
            for key in ("body", "condition"):
                for c in ins.attr_computations(key):
                    if c in self.comps:
                        b, nb, _ = self.computation(self.comps[c])
                        total, naive_total = total + b * trips, naive_total + nb * trips
            return (
                total,
                naive_total,
                {"trips": trips if counted is not None else f"{trips} (run-time bound)"},
            )
        if op == "call":
            callee = (ins.attr_computations("to_apply") or [""])[0]
            if callee in self.comps:
                b, nb, _ = self.computation(self.comps[callee])
                return b, nb, {}
        moved = self._kept_operands(comp, ins.operands) + self._kept(ins, ins.bytes)
        return round(moved), naive, {}

    def _fusion(self, comp: Computation, ins: Instr, naive: int) -> tuple[int, int, dict]:
        callee = (ins.attr_computations("calls") or [""])[0]
        fused = self.comps.get(callee)
        if fused is None:
            return naive, naive, {"fused": "missing"}
        demand = demanded_bytes(self.comps, fused)
        reads, how = 0, {}
        for i, p in enumerate(fused.params):
            if i >= len(ins.operands) or not p:
                continue
            operand = comp.instrs.get(ins.operands[i])
            full = operand.bytes if operand is not None else 0
            got = int(round(min(full, demand.get(p, 0.0))))
            if operand is not None:
                got = round(self._kept(operand, got))
            reads += got
            if got < full:
                how[ins.operands[i]] = {"charged": got, "full": full}
        written = self._written(ins, fused)
        detail: dict[str, Any] = {"read": reads, "written": written}
        if how:
            detail["row_params"] = how
        return reads + written, naive, detail

    def _written(self, ins: Instr, fused: Computation) -> int:
        """Bytes fusion ``ins`` (calling ``fused``) writes: each output, or where only device
        memory is counted, each output that is not placed on chip."""
        if not self.device_memory_only:
            return _output_written(self.comps, fused, fused.root)
        root = fused.instrs[fused.root]
        outputs = root.operands if root.opcode == "tuple" else [fused.root]
        types = _elements(ins.type) if root.opcode == "tuple" else [ins.type]
        return sum(
            _output_written(self.comps, fused, o)
            for o, t in zip(outputs, types, strict=False)
            if not _on_chip(t)
        )

    def computation(self, comp: Computation) -> tuple[int, int, list[Charge]]:
        charges = []
        for name in comp.order:
            ins = comp.instrs[name]
            b, nb, detail = self.charge(comp, ins)
            if b or nb:
                charges.append(Charge(name, ins.opcode, ins.op_name, b, nb, detail))
        return sum(c.bytes for c in charges), sum(c.naive for c in charges), charges


def row_aware_bytes(
    hlo_text: str, unknown_trips: int = 1, device_memory_only: bool = False
) -> dict[str, Any]:
    """``{"bytes", "naive_bytes", "instructions": [Charge...], "while_trip_counts_unknown"}``
    for the entry computation of ``hlo_text`` (``compiled.as_text()``); a ``while`` loop whose
    trip count XLA does not know is charged ``unknown_trips`` trips. ``device_memory_only``:
    only the bytes read from and written to device memory (HBM), not those of arrays XLA
    placed in on-chip memory (``S(1)`` layouts, as on TPU); on CPU, where XLA places nothing,
    the same count."""
    counter = Counter(hlo_text, unknown_trips, device_memory_only)
    total, naive, charges = counter.computation(counter.entry)
    return {
        "bytes": total,
        "naive_bytes": naive,
        "instructions": charges,
        "while_trip_counts_unknown": counter.unknown_loops,
    }


_LAYOUT = re.compile(r"\{([0-9,]*)(?::[^}]*)?\}")


def _dims(type_str: str) -> tuple[int, ...] | None:
    """The dimensions of an array type (None for a tuple or a token)."""
    found = _ARRAY.findall(type_str)
    if len(found) != 1 or type_str.lstrip().startswith("("):
        return None
    return tuple(int(d) for d in found[0][1].split(",") if d)


_MOVES = {"copy", "copy-start", "transpose", "reshape"}  # a reshape left after layout
# assignment is no bitcast: it rewrites the array (e.g. between TPU tilings)


def _relayouts(comps: dict[str, Computation], ins: Instr) -> bool:
    """Whether ``ins`` moves a whole array into a new buffer: a copy, transpose or reshape, or a
    fusion that is one (its fused root, through bitcasts)."""
    if ins.opcode in _MOVES:
        return True
    if ins.opcode != "fusion":
        return False
    fused = comps.get((ins.attr_computations("calls") or [""])[0])
    if fused is None:
        return False
    root = fused.instrs.get(fused.root)
    while root is not None and root.opcode == "bitcast" and root.operands:
        root = fused.instrs.get(root.operands[0])
    return root is not None and root.opcode in _MOVES


def whole_array_copies(hlo_text: str, shapes: list[tuple[int, ...]]) -> list[dict[str, Any]]:
    """The instructions of ``hlo_text`` (``compiled.as_text()``) outside fusions that copy,
    transpose or reshape into a whole array of one of ``shapes`` (a step's table and slot
    shapes, per device, logical or as stored):
    what a step that updated its tables in place would never do. Each is listed with its
    computation, result layout (XLA's minor-to-major order, tiling dropped), ``op_name`` and
    bytes moved (read and written in full).
    """
    comps = parse_module(hlo_text)
    fused = {
        callee
        for comp in comps.values()
        for ins in comp.instrs.values()
        if ins.opcode == "fusion"
        for callee in ins.attr_computations("calls")
    }
    wanted = {tuple(s) for s in shapes}
    out = []
    for comp in comps.values():
        if comp.name in fused:
            continue
        for name in comp.order:
            ins = comp.instrs[name]
            # an asynchronous copy's result is (destination, source, context)
            type_str = (
                _split_top(ins.type.strip()[1:-1])[0] if ins.opcode == "copy-start" else ins.type
            )
            if _dims(type_str) in wanted and _relayouts(comps, ins):
                layout = _LAYOUT.search(type_str)
                out.append(
                    {
                        "name": name,
                        "computation": comp.name,
                        "opcode": ins.opcode,
                        "shape": list(_dims(type_str) or ()),
                        "minor_to_major": layout.group(1) if layout else "",
                        "op_name": ins.op_name,
                        "bytes": 2 * shape_bytes(type_str),
                    }
                )
    return out


def expanded_loops(hlo_text: str) -> list[dict[str, Any]]:
    """The ``while`` loops of ``hlo_text`` that XLA made of a gather or a scatter it cannot emit
    as one (its ``op_name`` ends in the gather or scatter): one trip per index, a loop a TPU
    sequences trip by trip. Each is listed with its computation, ``op_name`` and trip count
    (None when XLA gives none)."""
    comps = parse_module(hlo_text)
    out = []
    for comp in comps.values():
        for name in comp.order:
            ins = comp.instrs[name]
            if ins.opcode == "while" and re.search(r"/(gather|scatter[\w-]*)$", ins.op_name):
                out.append(
                    {
                        "name": name,
                        "computation": comp.name,
                        "op_name": ins.op_name,
                        "trips": _trips(comps, comp, ins),
                    }
                )
    return out


def top(charges: list[Charge], n: int = 12) -> list[dict[str, Any]]:
    """The ``n`` costliest instructions (row-aware), as dicts."""
    return [c.as_dict() for c in sorted(charges, key=lambda c: -c.bytes)[:n]]


def main() -> None:
    text = open(sys.argv[1]).read()
    out = row_aware_bytes(text)
    print(
        json.dumps(
            {
                "bytes": out["bytes"],
                "naive_bytes": out["naive_bytes"],
                "top": top(out["instructions"], 15),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
