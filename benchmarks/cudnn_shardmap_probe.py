"""cuDNN attention inside shard_map on two GPUs: does the process survive, and do o, dq, dk, dv agree with the
blockwise loop? It decides whether LASP-2H may take cuDNN again (lasp_jax/parallel/softmax_allgather.py refuses
it since this probe's cases crashed on two H200s with jax 0.11.2).

    python3 -m benchmarks.cudnn_shardmap_probe CASE       # one case per process: a crash takes only its own

Cases (bf16, 32 query heads and 8 K/V heads of 64; errors: max |difference| / max |blockwise|):
  lasp2h_docs, lasp2h_causal: each rank of a seq=2 mesh gathers K/V and runs causal_softmax_attention(impl="cudnn")
    with its queries at the global offset rank * L (a dense mask), T = 4096, with 4-ish documents or none: what
    softmax_allgather_attention's ranks ran before the refusal. Session 11 (commit 14cca61, through
    softmax_allgather_attention(impl="auto"), which took this call): a segmentation fault in both.
  packed_dp: causal_softmax_attention(impl="cudnn") with documents from key 0 (the packed layout) inside a
    shard_map over a data=2 mesh, B = 2, T = 2048. Session 11: ran, largest error 6.8e-3 (dk).
  causal_dp: the same without documents (cuDNN's own causal mask). Session 12: ran, largest error 6.5e-3 (dk);
    packed_dp again: ran, 6.8e-3 (dk). Both on a 1-D data mesh, every axis manual.
  packed_dp_seq1, causal_dp_seq1: the same on a (data 2, seq 1) mesh with the shard_map over data alone (seq left
    to XLA), as models/softmax.py runs a data-parallel hybrid's layers per device, where "auto" does not take cuDNN
    (lasp_jax.ops.softmax._cudnn_applies asks for every mesh axis manual). Session 14: packed_dp_seq1 failed to
    lower (a verifier error in Shardy's rule for cuDNN's custom_partitioning: "dim mapping can't have a factor of
    size 1 if there are multiple factors"), causal_dp_seq1 died with a segmentation fault; so that check stays.
On CPU the cuDNN cases fail with jax's "cuDNN is not detected".
"""

from __future__ import annotations

import functools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lasp_jax.ops.softmax import causal_softmax_attention

CASES = ("lasp2h_docs", "lasp2h_causal", "packed_dp", "causal_dp", "packed_dp_seq1", "causal_dp_seq1")


def _rank(q, k, v, ids, impl):
    """One seq rank as LASP-2H runs it: K, V and the ids gathered, queries at their global offset."""
    gather = functools.partial(jax.lax.all_gather, axis_name="seq", axis=1, tiled=True)
    offset = jax.lax.axis_index("seq") * q.shape[1]
    return causal_softmax_attention(q, gather(k), gather(v), segment_ids=None if ids is None else gather(ids),
                                    q_offset=offset, impl=impl)


def run(case: str) -> dict:
    """{error name: max relative difference} of impl="cudnn" against "blockwise" for `case` (see the module)."""
    rng = np.random.default_rng(0)
    data_parallel = "_dp" in case
    seq1 = case.endswith("_seq1")
    b, t = (2, 2048) if data_parallel else (1, 4096)
    q = jnp.asarray(rng.standard_normal((b, t, 32, 64)) * 0.5, jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, t, 8, 64)) * 0.5, jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, t, 8, 64)), jnp.bfloat16)
    ids = None if "causal" in case else jnp.asarray(np.cumsum(rng.uniform(size=(b, t)) < 4 / t, axis=1), jnp.int32)
    axis = "data" if data_parallel else "seq"
    mesh = (jax.make_mesh((2, 1), ("data", "seq"), axis_types=(jax.sharding.AxisType.Auto,) * 2) if seq1 else
            jax.make_mesh((2,), (axis,), axis_types=(jax.sharding.AxisType.Auto,)))
    spec = P(axis) if data_parallel else P(None, axis)

    def grads(impl):
        if data_parallel:
            body = lambda q, k, v, ids: causal_softmax_attention(q, k, v, segment_ids=ids, impl=impl)  # noqa: E731
        else:
            body = functools.partial(_rank, impl=impl)
        attend = jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, None if ids is None else spec),
                               out_specs=spec, **({"axis_names": frozenset({"data"})} if seq1 else {}))

        def loss(q, k, v):
            o = attend(q, k, v, ids)
            return jnp.sum(o.astype(jnp.float32) ** 2), o
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            out = jax.block_until_ready(jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v))
        print(f"{case} {impl}: compiled and ran in {time.perf_counter() - t0:.1f} s", flush=True)
        return out

    (_, o), g = grads("cudnn")
    (_, o_ref), g_ref = grads("blockwise")
    rel = lambda a, r: float(jnp.max(jnp.abs(a.astype(jnp.float32) - r.astype(jnp.float32)))  # noqa: E731
                             / jnp.max(jnp.abs(r.astype(jnp.float32))))
    return {"o": rel(o, o_ref), **{f"d{n}": rel(a, r) for n, a, r in zip("qkv", g, g_ref)}}


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in CASES:
        sys.exit(f"usage: python3 -m benchmarks.cudnn_shardmap_probe CASE, CASE one of {CASES}")
    print(sys.argv[1], run(sys.argv[1]), flush=True)
