"""A small reader for compiled (post-optimisation) HLO text: instructions of the entry computation and their
data dependencies, enough to ask which work depends on which collective."""

from __future__ import annotations

import dataclasses
import math
import re

COLLECTIVES = ("collective-permute", "all-gather", "all-reduce", "all-to-all", "reduce-scatter")
_NAME = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Instr:
    name: str
    shape: str  # e.g. "f32[1,2,8,8]{3,2,1,0}" or a tuple "(f32[2], s32[])"
    opcode: str
    operands: tuple[str, ...]
    attrs: str
    root: bool

    @property
    def dims(self) -> tuple[int, ...]:
        m = re.match(r"\w+\[([\d,]*)\]", self.shape)
        return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()

    @property
    def size(self) -> int:
        return math.prod(self.dims)

    @property
    def is_collective(self) -> bool:
        return any(self.opcode.startswith(c) for c in COLLECTIVES) and not self.opcode.endswith("-done")

    @property
    def pairs(self) -> list[tuple[int, int]]:
        m = re.search(r"source_target_pairs=\{(.*?)\}\}", self.attrs)
        return [tuple(map(int, p)) for p in re.findall(r"\{(\d+),(\d+)", m.group(1) + "}")] if m else []


def _split_balanced(text: str) -> tuple[str, str]:
    """Splits '(...)rest' at the parenthesis that closes the first one."""
    depth = 0
    for i, ch in enumerate(text):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return text[: i + 1], text[i + 1:]
    raise ValueError(f"unbalanced: {text[:80]}")


def entry_instructions(hlo_text: str) -> dict[str, Instr]:
    body = hlo_text[hlo_text.index("\nENTRY"):]
    body = body[: body.index("\n}")]
    instrs: dict[str, Instr] = {}
    for line in body.splitlines()[1:]:
        m = re.match(r"\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)", line)
        if not m:
            continue
        rest = m.group(3)
        if rest.startswith("("):
            shape, rest = _split_balanced(rest)
        else:
            shape, rest = rest.split(" ", 1)
        rest = rest.strip()
        opcode = rest[: rest.index("(")]
        args, attrs = _split_balanced(rest[len(opcode):])
        instrs[m.group(2)] = Instr(m.group(2), shape, opcode, tuple(_NAME.findall(args)), attrs, bool(m.group(1)))
    return instrs


def descendants(instrs: dict[str, Instr], sources) -> set[str]:
    """Every instruction that (transitively) consumes one of `sources`."""
    users: dict[str, list[str]] = {}
    for ins in instrs.values():
        for op in ins.operands:
            users.setdefault(op, []).append(ins.name)
    seen, todo = set(), list(sources)
    while todo:
        for u in users.get(todo.pop(), ()):
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen
