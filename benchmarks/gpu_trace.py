"""Where a compiled step's GPU time goes: a profiler trace's kernels, summed by kind and by the source line that
made them.

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True): one step
    times = kernel_times(trace_dir)                 # {(kernel, hlo_op): ms per GPU}
    print(render(summarize(times, compiled.as_text()), "title"))

Each GPU kernel event in the Perfetto trace names its kernel and, in its args, the HLO instruction that launched it
(`hlo_op`). The optimized HLO's metadata gives each instruction the Python stack that emitted its root op (a
stack_frame_id into the tables at the top of the HLO text) and its `op_name` (the transformation stack:
`transpose(jvp(...))` marks the backward), so kernel time can be read per line of models/ and lasp_jax/ rather
than per fusion number. Kernels are also
summed by kind: matmuls (cuBLAS / CUTLASS / XLA's Triton GEMMs), fused elementwise and reductions (XLA's fusions),
cuDNN's attention kernels, custom kernels (Pallas: Triton and Mosaic GPU), copies and collectives.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
from pathlib import Path

_KINDS = (  # first match wins
    ("collective", re.compile(r"nccl", re.I)),
    ("copy", re.compile(r"memcpy|memset|copy_", re.I)),
    ("cudnn attention", re.compile(r"cudnn", re.I)),  # its flash kernels' names also hold sm90_ and "fusion"
    ("matmul", re.compile(r"gemm|nvjet|cutlass|xmma|cublas|wgmma|sm90_|sm80_", re.I)),
    ("xla fusion", re.compile(r"fusion|^loop_|^input_|^wrapped_|^concatenate|^transpose|^reduce|^slice|"
                              r"^dynamic|^pad|^select|^scatter|^gather|^broadcast|^convert|^bitcast", re.I)),
)
_METADATA = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}", re.M)
_FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
_SECTION_ROW = re.compile(r"^(\d+) (.*)$")


def kind(kernel: str) -> str:
    """The kind of a GPU kernel from its name: matmul, xla fusion, cudnn attention, collective, copy, or custom
    (Pallas and anything else)."""
    return next((k for k, pattern in _KINDS if pattern.search(kernel)), "custom")


def _trace_file(trace_dir: str | Path) -> Path:
    found = sorted(Path(trace_dir).rglob("perfetto_trace.json.gz"))
    if not found:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir} (trace with create_perfetto_trace=True)")
    return found[-1]


def kernel_times(trace_dir: str | Path) -> dict[tuple[str, str], float]:
    """{(kernel name, the HLO instruction in its args or ""): ms per GPU} over the events of the trace's GPU
    processes (one per GPU), summed and divided by their number."""
    with gzip.open(_trace_file(trace_dir), "rt") as fh:
        data = json.load(fh)
    events = data["traceEvents"] if isinstance(data, dict) else data
    gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                and "GPU" in str(e.get("args", {}).get("name", ""))}
    totals: dict[tuple[str, str], float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("pid") in gpu_pids:
            args = e.get("args", {})
            op = args.get("hlo_op") or args.get("long_name") or args.get("tf_op") or ""
            totals[(e.get("name", "?"), str(op))] += e.get("dur", 0) / 1e3
    return {key: ms / len(gpu_pids) for key, ms in totals.items()}


def _sections(hlo_text: str) -> dict[str, dict[int, str]]:
    """The optimized HLO's stack-frame tables (FileNames, FunctionNames, FileLocations, StackFrames): {section:
    {id: row text}}, read from the header before the first computation."""
    sections, current = {}, None
    for line in hlo_text.split("\n%", 1)[0].splitlines():
        row = _SECTION_ROW.match(line)
        if row and current is not None:
            sections[current][int(row.group(1))] = row.group(2)
        elif line.strip() and " " not in line.strip():
            current = line.strip()
            sections[current] = {}
    return sections


def _frames(hlo_text: str) -> dict[int, list[str]]:
    """{stack_frame_id: ['path:line', ...] innermost first}. A frame's parent_frame_id is printed one above the
    parent's id (0: none), as XLA writes the tables."""
    sec = _sections(hlo_text)
    files = {i: v.strip('"') for i, v in sec.get("FileNames", {}).items()}
    locations = {}
    for i, row in sec.get("FileLocations", {}).items():
        f = dict(_FIELD.findall(row.strip("{}")))
        locations[i] = f"{files.get(int(f.get('file_name_id', 0)), '?')}:{f.get('line', '?')}"
    raw = {i: dict(_FIELD.findall(row.strip("{}"))) for i, row in sec.get("StackFrames", {}).items()}
    chains = {}
    for i in raw:
        chain, j, seen = [], i, set()
        while j in raw and j not in seen:
            seen.add(j)
            chain.append(locations.get(int(raw[j].get("file_location_id", 0)), "?"))
            j = int(raw[j].get("parent_frame_id", 0)) - 1
        chains[i] = chain
    return chains


def _short(location: str) -> str:
    match = re.search(r"(lasp_jax|models|train)/.*", location)
    return match.group(0) if match else location


def _label(chain: list[str]) -> str:
    """A frame chain (innermost first) as the innermost line in models/, followed by ' > ' and the innermost in
    lasp_jax/ when that is further in ('models/attention.py:68 > lasp_jax/ops/vjp.py:120'); else the innermost
    line of lasp_jax/ or train/; else the innermost."""
    ours = lambda prefix: next((i for i, loc in enumerate(chain) if f"/{prefix}" in loc), None)  # noqa: E731
    model, op, train = ours("models/"), ours("lasp_jax/"), ours("train/")
    if model is not None:
        inner = f" > {_short(chain[op])}" if op is not None and op < model else ""
        return _short(chain[model]) + inner
    first = next((i for i in (op, train) if i is not None), 0 if chain else None)
    return "?" if first is None else _short(chain[first])


def hlo_sources(hlo_text: str) -> dict[str, tuple[str, str]]:
    """{instruction name: (source, pass)} from optimized HLO text: the source is _label's; the pass 'backward'
    where the op_name holds a transpose, else 'forward'."""
    chains = _frames(hlo_text)
    out = {}
    for name, fields in _METADATA.findall(hlo_text):
        f = {k: v.strip('"') for k, v in _FIELD.findall(fields)}
        out[name] = (_label(chains.get(int(f.get("stack_frame_id", 0)), [])),
                     "backward" if "transpose(" in f.get("op_name", "") else "forward")
    return out


def summarize(times: dict[tuple[str, str], float], hlo_text: str, top: int = 40) -> dict:
    """Totals by kind, the `top` kernels and the `top` (source line, pass) pairs, each in ms, largest first."""
    sources = hlo_sources(hlo_text)
    kinds, kernels, lines = (collections.defaultdict(float) for _ in range(3))
    for (kernel, op), ms in times.items():
        kinds[kind(kernel)] += ms
        kernels[kernel] += ms
        # An XLA fusion's kernel is named after its instruction, '.' made '_' (loop_add_fusion_97: loop_add_fusion.97).
        line, pass_ = next((sources[name] for name in (op, kernel, re.sub(r"_(\d+)$", r".\1", kernel))
                            if name in sources), ("?", "?"))
        lines[(line, pass_, kind(kernel))] += ms
    largest = lambda d: sorted(d.items(), key=lambda kv: -kv[1])[:top]  # noqa: E731
    return {"total_ms": sum(times.values()), "kinds": dict(largest(kinds)),
            "kernels": largest(kernels), "lines": [(*key, ms) for key, ms in largest(lines)]}


def render(summary: dict, title: str) -> str:
    """The summary as Markdown."""
    total = summary["total_ms"] or 1.0
    out = [f"# {title}", "", f"GPU kernel time in the traced step: {summary['total_ms']:.1f} ms per GPU", "",
           "| kind | ms | share |", "| --- | --- | --- |"]
    out += [f"| {k} | {ms:.1f} | {ms / total:.1%} |" for k, ms in summary["kinds"].items()]
    out += ["", "| source line | pass | kind | ms | share |", "| --- | --- | --- | --- | --- |"]
    out += [f"| {line} | {p} | {k} | {ms:.1f} | {ms / total:.1%} |" for line, p, k, ms in summary["lines"]]
    out += ["", "| kernel | ms | share |", "| --- | --- | --- |"]
    out += [f"| `{name[:90]}` | {ms:.1f} | {ms / total:.1%} |" for name, ms in summary["kernels"]]
    return "\n".join(out) + "\n"
