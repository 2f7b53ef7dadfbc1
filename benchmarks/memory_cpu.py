"""Compile-only memory of the training step on a forced host mesh: what each device would hold, per mesh.

    python -m benchmarks.memory_cpu [--model tnl-1b] [--layers 2] [--tokens-per-device 65536]
        [--meshes 1x1,1x2,1x4,2x2,1x8,2x4] [--remat block] [--param-axis data,seq] [--top 6]

For each mesh data x seq (D sequences of seq * tokens-per-device tokens, so every device holds the same number
of tokens) it lowers and compiles `train.step.make_steps`'s training step, the jit that `python -m train`
runs, on abstract arguments (eval_shape'd parameters and AdamW state on their partition specs: nothing is
allocated) and prints XLA's per-device buffer sizes from `compiled.memory_analysis()`: arguments (parameters,
optimizer state, the batch), outputs (the new state, donated into the arguments' buffers), temporaries and
generated code. With --top N it also names the N largest buffers live at XLA's peak (by the JAX operation that
made them, from the live-range report that --xla_dump_to writes: set here before JAX starts) and the N largest
the collectives of the optimized HLO (how many of each, their total and largest result).

What this measures, and what it does not: on the host (8 forced CPU devices) it is XLA:CPU's schedule and buffer
assignment, not XLA:GPU's (no latency-hiding scheduler, no autotuning, and no all-reduce + slice turned into a
reduce-scatter, so every gradient is reduced at full size); attention is the chunked XLA implementation there
(--attn-impl xla: the Pallas kernels do not lower for CPU), whose per-chunk states dominate long sequences, unlike
the fused kernels'. What it shows is how each buffer class scales with the mesh at fixed tokens per device.
--layers keeps a model's shapes and cuts its depth (2 layers compile in seconds; all 16 of TNL-1B in about two
minutes per mesh). On a GPU machine the same script reads XLA:GPU's plan (--attn-impl auto, --layers 16; the
meshes must fit the GPUs there).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import typing
from pathlib import Path

_DUMP = Path(tempfile.mkdtemp(prefix="memory_cpu_"))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           f" --xla_dump_to={_DUMP} --xla_dump_hlo_module_re=.*train_step.*")

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

import models  # noqa: E402
from benchmarks.measure import provenance  # noqa: E402
from models import presets  # noqa: E402
from models.config import Remat  # noqa: E402
from train.config import TrainConfig  # noqa: E402
from train.optim import make_optimizer  # noqa: E402
from train.step import make_steps, model_config  # noqa: E402

GIB = 2 ** 30


def abstract_state(mcfg: models.ModelConfig, cfg: TrainConfig, mesh):
    """(graphdef, state) of (model, AdamW optimizer) as ShapeDtypeStructs on the partition specs that
    train.step.build_state places them on; nothing is allocated."""
    tx = make_optimizer(cfg)

    def make():
        model = models.build_model(mcfg, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    with jax.set_mesh(mesh):
        graphdef, state = nnx.split(nnx.eval_shape(make))
    specs = nnx.get_partition_spec(state)
    return graphdef, jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)), state, specs)


def peak_breakdown(live_range: str, top: int) -> list[tuple[int, str]]:
    """The `top` largest buffers live at the peak of an XLA live-range dump, named by the JAX operation that
    made them (its name stack, e.g. "transpose(jvp(...))/checkpoint/.../mul") or by the argument they hold, as
    (bytes, name), largest first. Parameters and optimizer state are left out: the argument size counts them."""
    found = []
    for name, current in re.findall(r"^[ │]*[├└]── (.+) \(\S+%, total: [\d ]+ bytes, current: ([\d ]+) bytes",
                                    live_range, flags=re.M):
        if not name.startswith("state["):
            found.append((int(current.replace(" ", "")), name.removeprefix("jit(train_step)/")))
    return sorted(found, key=lambda t: -t[0])[:top]


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "f64": 8}


def collectives(hlo: str) -> dict[str, tuple[int, int, int]]:
    """{op: (count, total bytes of their results, largest result in bytes)} of the all-gather, all-reduce,
    reduce-scatter, all-to-all and collective-permute instructions in an optimized HLO module's text (a
    combined collective's tuple result counts as one instruction, its arrays summed)."""
    found: dict[str, tuple[int, int, int]] = {}
    for result, op in re.findall(
            r"^\s*(?:ROOT )?\S+ = (\([^)]*\)|\w+\[[\d,]*\])\S* (all-gather|all-reduce|reduce-scatter|all-to-all|"
            r"collective-permute)(?:-start)?\(", hlo, flags=re.M):
        size = sum(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dtype, 4)
                   for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result))
        count, total, largest = found.get(op, (0, 0, 0))
        found[op] = (count + 1, total + size, max(largest, size))
    return found


def measure(args, data: int, seq: int) -> dict:
    """Compiles the training step for a data x seq mesh and returns its per-device sizes in bytes."""
    seq_len = seq * args.tokens_per_device
    model = presets.get(args.model).replace(n_layers=args.layers, remat=args.remat, ce_chunk=args.ce_chunk,
                                            attn_impl=args.attn_impl, strategy=args.strategy,
                                            param_axis=args.param_axis or None)
    cfg = TrainConfig(model=model, mesh=f"data={data},seq={seq}", seq_len=seq_len, batch_size=data,
                      compute_dtype="float32", warmup_steps=10, decay_steps=1000)
    # bf16 compute as on the GPUs: XLA:CPU compiles it (only running a bf16 x bf16 -> f32 dot fails there).
    mcfg = model_config(cfg, model.vocab_size).replace(dtype="bfloat16")
    mesh = jax.make_mesh((data, seq), ("data", "seq"), devices=jax.devices()[:data * seq],
                         axis_types=(AxisType.Auto,) * 2)
    graphdef, state = abstract_state(mcfg, cfg, mesh)
    tokens = jax.ShapeDtypeStruct((data, seq_len), jax.numpy.int32, sharding=NamedSharding(mesh, P("data", "seq")))
    train_step, _ = make_steps(graphdef)
    shutil.rmtree(_DUMP)
    with jax.set_mesh(mesh):
        compiled = train_step.lower(state, {"inputs": tokens, "targets": tokens}).compile()
    mem = compiled.memory_analysis()
    dumps = sorted(_DUMP.glob("*train_step*live-range.txt"))
    return {"mesh": f"{data}x{seq}", "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
            "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
            "code": mem.generated_code_size_in_bytes,
            "peak": peak_breakdown(dumps[-1].read_text(), args.top) if dumps and args.top else [],
            "collectives": collectives(compiled.as_text())}


def main(argv=None):
    try:
        report(argv)
    finally:
        shutil.rmtree(_DUMP, ignore_errors=True)


def report(argv=None):
    """Parses the command line and prints one row (and its peak and collectives) per mesh."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tnl-1b")
    parser.add_argument("--layers", type=int, default=2, help="the preset's depth cut to this many layers")
    parser.add_argument("--tokens-per-device", type=int, default=64 * 1024)
    parser.add_argument("--meshes", default="1x1,1x2,1x4,2x2,1x8,2x4", help="data x seq, comma-separated")
    parser.add_argument("--remat", default="block", choices=typing.get_args(Remat))
    parser.add_argument("--ce-chunk", type=int, default=2048, help="as benchmarks/bench_train_gpu.py")
    parser.add_argument("--strategy", default="ring")
    parser.add_argument("--attn-impl", default="xla", help="the models' per-device attention (auto on GPUs)")
    parser.add_argument("--param-axis", default="data,seq",
                        help="mesh axes the parameters and AdamW moments shard over, jointly ('' replicates)")
    parser.add_argument("--top", type=int, default=6, help="name this many buffers live at the peak")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    axes = tuple(a for a in args.param_axis.split(",") if a)
    args.param_axis = axes[0] if len(axes) == 1 else axes
    meshes = []
    for shape in args.meshes.split(","):
        if not re.fullmatch(r"[1-9]\d*x[1-9]\d*", shape):
            raise ValueError(f"--meshes: {shape!r} is not DATAxSEQ (e.g. 2x4)")
        data, seq = (int(x) for x in shape.split("x"))
        if data * seq > len(jax.devices()):
            raise ValueError(f"--meshes: {shape} needs {data * seq} devices, this machine has {len(jax.devices())}")
        meshes.append((data, seq))

    print(f"# {json.dumps(provenance('benchmarks.memory_cpu', argv, ('jax', 'jaxlib', 'flax', 'optax')))}")
    print(f"# {args.model} cut to {args.layers} layers, remat {args.remat}, {args.tokens_per_device} tokens per "
          f"device, parameters over {args.param_axis or 'nothing (replicated)'}, attention {args.attn_impl}, "
          f"strategy {args.strategy}, on {jax.devices()[0].device_kind}; GiB per device")
    print(f"{'mesh':>5} {'arguments':>10} {'outputs':>8} {'aliased':>8} {'temporaries':>12} {'code':>8}")
    for data, seq in meshes:
        r = measure(args, data, seq)
        print(f"{r['mesh']:>5} {r['arguments'] / GIB:10.3f} {r['outputs'] / GIB:8.3f} {r['aliased'] / GIB:8.3f} "
              f"{r['temporaries'] / GIB:12.3f} {r['code'] / GIB:8.4f}", flush=True)
        for size, value in r["peak"]:
            print(f"{'':>7}{size / GIB:8.3f}  at the peak: {value[:160]}")
        print(f"{'':>7}collectives: " + ", ".join(f"{n} {op} ({total / GIB:.3f} GiB, largest {big / GIB:.3f})"
                                                  for op, (n, total, big) in sorted(r["collectives"].items())))


if __name__ == "__main__":
    main()
