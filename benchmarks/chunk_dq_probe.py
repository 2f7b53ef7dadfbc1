"""Probe: Mamba-2's dQ and dK without a chunk chain (KERNEL_NOTES.md, sessions 26-27), timed beside the walks.

    python3 -m benchmarks.chunk_dq_probe [--t 65536] [--heads 64] [--dk 128] [--dv 64] [--docs 16]
        [--configs 8:3,4:3] [--walks 4:3] [--pieces 16] [--iters 10] [--reps 3] [--out DIR] [--interpret]

Why: in the Mamba-2 1.3B step the dQ and dK walks (one head per CTA, a serial chain of chunk steps each) take
89 ms each and their per-head shares' sums 27 ms more (TRAIN_GPU_NOTES.md, session 19). Under GVA (H output
heads reading one group's q = C and k = B), given the state S_c entering every chunk c of C rows and the
cotangent G_c of the state leaving it (per head; P_h = (dO_h V_h^T) o M_h the masked, decayed, scaled scores),

    dq = (sum_h P_h) K + sum_h diag(scale q_side_h) dO_h S_h^T,   dk = (sum_h P_h)^T Q + sum_h diag(k_side_h) V_h G_h^T

so chunks are independent and the heads meet in float32 accumulators ([C, C] and [C, Dk]), not in per-head [T, Dk]
shares. The rates' gradient is chunk-local too (`rates_grad`), so the states can be bf16 without the cross-chunk
cancellation the walks' suffix sums need (their states are two bf16 operands, hi + lo).

This module holds, as measurements and not kernels of the library: the dQ kernel (one program per chunk looping
over the heads; it also writes the rates' gradient's row terms), its dK mirror (writes b_r), the states
walk that would feed them (one program per (head, piece) walking its chunks, writing each entering state in bf16:
[B, H, T / C, Dk, Dv], 1 GiB a layer at Mamba-2 1.3B's shape), XLA oracles of all of them, and timings beside the
library's own SSD layer (the Mosaic walks) on the same GPU. Not here: the G_c writes (the dV walk would make them)
and D_c.

Checks (printed, and in the JSON): the oracles' dq, dk and rates' gradient against autodiff of lasp_jax's XLA path
(float32), the rates' gradient also with the states rounded to bf16 (and, at --t, the library's own against the
same autodiff), and each kernel against its oracle, so that a wrong formula fails, not only a wrong kernel.
Writes DIR/chunk_dq_probe.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

import lasp_jax
from benchmarks import measure
from lasp_jax.ops import kernel_support, pieces, pieces_tokens, states

_F32 = jnp.float32
_BF16 = jnp.bfloat16


def _scores(do, v, cum, keep, scale):
    """P = scale exp(-max(bc_i - bc_j, 0)) (dO_i . v_j) where keep, else 0 (a select): [C, C] float32."""
    gap = jnp.maximum(cum[:, None] - cum[None, :], 0.0)
    return jnp.where(keep, scale * jnp.exp(-gap) * jnp.dot(do, v.T, preferred_element_type=_F32), 0.0)


def _keep(counts, c):
    """[C, C] bool: j <= i in one document."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    return (rows >= jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)) & (counts[:, None] == counts[None, :])


def _dq_kernel(q_ref, k_ref, do_ref, v_ref, s_ref, cum_ref, side_ref, counts_ref, dq_ref, a_ref, net_ref, *,
               heads: int, scale: float):
    """One chunk of C rows. Blocks: q, k [C, Dk]; do, v [C, H, Dv]; s [H, Dk, Dv] bf16 (S_c); cum, side (q_side)
    [H, C]; counts [C] int32. Out: dq [C, Dk], a [H, C] (a_t = scale q_side_t q_t . (dO_t S^T)) and net [H, C]
    (row sum minus column sum of W = P o (Q K^T), whose suffix sums are the A_u of `rates_grad`), float32."""
    q, k = q_ref[...], k_ref[...]
    c = q.shape[0]
    qk = jnp.dot(q, k.T, preferred_element_type=_F32)
    keep = _keep(counts_ref[...], c)
    q32 = q.astype(_F32)

    def head(h, carry):
        scores_sum, state_sum = carry
        do = do_ref[:, h, :]
        p = _scores(do, v_ref[:, h, :], cum_ref[h, :], keep, scale)
        inter = jnp.dot(do, s_ref[h].T, preferred_element_type=_F32)
        weight = scale * side_ref[h, :]
        a_ref[h, :] = weight * jnp.sum(q32 * inter, axis=1)
        pairs = p * qk
        net_ref[h, :] = jnp.sum(pairs, axis=1) - jnp.sum(pairs, axis=0)
        return scores_sum + p, state_sum + weight[:, None] * inter

    zeros = (jnp.zeros((c, c), _F32), jnp.zeros(q.shape, _F32))
    scores_sum, state_sum = jax.lax.fori_loop(0, heads, head, zeros)
    dq_ref[...] = jnp.dot(scores_sum.astype(k.dtype), k, preferred_element_type=_F32) + state_sum


def _dk_kernel(q_ref, k_ref, do_ref, v_ref, g_ref, cum_ref, side_ref, counts_ref, dk_ref, b_ref, *, heads: int,
               scale: float):
    """`_dq_kernel`'s mirror. Blocks as there with g [H, Dk, Dv] bf16 (G_c) and side = k_side. Out: dk [C, Dk]
    and b [H, C] (b_r = k_side_r k_r . (v_r G^T)), float32."""
    q, k = q_ref[...], k_ref[...]
    c = q.shape[0]
    keep = _keep(counts_ref[...], c)
    k32 = k.astype(_F32)

    def head(h, carry):
        scores_sum, state_sum = carry
        v = v_ref[:, h, :]
        p = _scores(do_ref[:, h, :], v, cum_ref[h, :], keep, scale)
        inter = jnp.dot(v, g_ref[h].T, preferred_element_type=_F32)
        side = side_ref[h, :]
        b_ref[h, :] = side * jnp.sum(k32 * inter, axis=1)
        return scores_sum + p, state_sum + side[:, None] * inter

    zeros = (jnp.zeros((c, c), _F32), jnp.zeros(k.shape, _F32))
    scores_sum, state_sum = jax.lax.fori_loop(0, heads, head, zeros)
    dk_ref[...] = jnp.dot(scores_sum.T.astype(q.dtype), q, preferred_element_type=_F32) + state_sum


def _chunk_call(kernel, q, k, do, v, states, cum, side, counts, n_head_rows: int, *, chunk: int, scale: float,
                warps: int, stages: int, interpret: bool):
    """Launches `kernel` over (batch, chunk): outputs [B, T, Dk] and n_head_rows of [B, H, T], float32."""
    b, t, dk = q.shape
    h, dv = v.shape[2:]
    row = pl.BlockSpec((None, chunk, dk), lambda i, c: (i, c, 0))
    heads_rows = pl.BlockSpec((None, chunk, h, dv), lambda i, c: (i, c, 0, 0))
    state = pl.BlockSpec((None, h, None, dk, dv), lambda i, c: (i, 0, c, 0, 0))
    table = pl.BlockSpec((None, h, chunk), lambda i, c: (i, 0, c))
    counts_spec = pl.BlockSpec((None, chunk), lambda i, c: (i, c))
    return pl.pallas_call(
        functools.partial(kernel, heads=h, scale=scale),
        grid=(b, t // chunk),
        in_specs=[row, row, heads_rows, heads_rows, state, table, table, counts_spec],
        out_specs=[row] + [table] * n_head_rows,
        out_shape=[jax.ShapeDtypeStruct((b, t, dk), _F32)] + [jax.ShapeDtypeStruct((b, h, t), _F32)] * n_head_rows,
        compiler_params=pl_triton.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
    )(q, k, do, v, states, cum, side, counts)


def chunk_dq(q, k, do, v, entering, tables: pieces_tokens.ChunkTables, *, chunk: int, scale: float, warps: int = 8,
             stages: int = 3, interpret: bool = False):
    """(dq [B, T, Dk], a [B, H, T], net [B, H, T]) float32 of one group: q, k [B, T, Dk]; do, v [B, T, H, Dv];
    entering [B, H, T / C, Dk, Dv] bf16 (S_c); tables as pieces_tokens.tables gives them for chunks of C rows."""
    return _chunk_call(_dq_kernel, q, k, do, v, entering, tables.cum, tables.q_side, tables.counts, 2, chunk=chunk,
                       scale=scale, warps=warps, stages=stages, interpret=interpret)


def chunk_dk(q, k, do, v, leaving, tables: pieces_tokens.ChunkTables, *, chunk: int, scale: float, warps: int = 8,
             stages: int = 3, interpret: bool = False):
    """(dk [B, T, Dk], b [B, H, T]) float32, as `chunk_dq` with leaving [B, H, T / C, Dk, Dv] bf16 (G_c)."""
    return _chunk_call(_dk_kernel, q, k, do, v, leaving, tables.cum, tables.k_side, tables.counts, 1, chunk=chunk,
                       scale=scale, warps=warps, stages=stages, interpret=interpret)


def _states_kernel(k_ref, v_ref, k_side_ref, q_side_ref, s_in_ref, out_ref, *, chunk: int):
    """One (batch, head, piece): S from the piece's entering state, each chunk's entering S stored in bf16, then
    S <- decay S + (k_side k)^T v (decay: q_side at the chunk's last row, 0 after a document start). Blocks: k
    [L, Dk], v [L, Dv], k_side and q_side [L], s_in [Dk, Dv] float32; out [L / C, Dk, Dv] bf16."""
    last = jax.lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1

    def step(n, state):
        rows = pl.ds(n * chunk, chunk)
        out_ref[n] = state.astype(out_ref.dtype)
        k = kernel_support.rounded_to(k_ref[rows, :].astype(_F32) * k_side_ref[rows][:, None], k_ref.dtype)
        decay = jnp.sum(jnp.where(last, q_side_ref[rows], 0.0))
        return decay * state + jnp.dot(k.astype(k_ref.dtype).T, v_ref[rows, :], preferred_element_type=_F32)

    jax.lax.fori_loop(0, out_ref.shape[0], step, s_in_ref[...])


def states_walk(k, v, tables: pieces_tokens.ChunkTables, pieces_in, plan: pieces.Plan, *, warps: int = 4,
                stages: int = 2, interpret: bool = False):
    """The state entering every chunk [B, H, T / C, Dk, Dv] bf16 from the state entering every piece pieces_in
    [B, H, P, Dk, Dv] float32: k [B, T, Dk] (the group), v [B, T, H, Dv]."""
    b, t, dk = k.shape
    h, dv = v.shape[2:]
    length, chunks = plan.piece_len, plan.piece_len // plan.chunk
    return pl.pallas_call(
        functools.partial(_states_kernel, chunk=plan.chunk),
        grid=(b, h, plan.pieces),
        in_specs=[pl.BlockSpec((None, length, dk), lambda i, j, p: (i, p, 0)),
                  pl.BlockSpec((None, length, None, dv), lambda i, j, p: (i, p, j, 0)),
                  pl.BlockSpec((None, None, length), lambda i, j, p: (i, j, p)),
                  pl.BlockSpec((None, None, length), lambda i, j, p: (i, j, p)),
                  pl.BlockSpec((None, None, None, dk, dv), lambda i, j, p: (i, j, p, 0, 0))],
        out_specs=pl.BlockSpec((None, None, chunks, dk, dv), lambda i, j, p: (i, j, p, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, t // plan.chunk, dk, dv), _BF16),
        compiler_params=pl_triton.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
    )(k, v, tables.k_side, tables.q_side, pieces_in)


def chunk_states(q, k, v, do, rates, starts, plan: pieces.Plan, scale: float):
    """(ChunkTables, S_c, G_c [B, H, T / C, Dk, Dv] float32, the states entering plan's pieces [B, H, P, Dk, Dv])
    from rates [B, T, H] and starts [B, T] bool: the piece driver's own tables and scans, one piece per chunk for
    S_c and G_c (zero S_in and end cotangent). The chunk tables do not depend on the piece length."""
    b, t, h = rates.shape
    n, chunk = t // plan.chunk, plan.chunk
    per_chunk = pieces.Plan(chunk=chunk, pieces=n, piece_len=chunk, pad=0)
    tables, weights = pieces_tokens.tables(jnp.moveaxis(rates, 1, 2), starts, per_chunk)
    qc, kc = (x.reshape(b, n, chunk, -1).astype(_F32) for x in (q, k))
    vc, doc = (x.reshape(b, n, chunk, h, -1).astype(_F32) for x in (v, do))
    sums = functools.partial(jnp.einsum, "bhnc,bncd,bnche->bhnde", precision="highest")
    to_end, from_start = (w.reshape(b, h, n, chunk) for w in (weights.to_end, weights.from_start))
    entering = pieces.entering(sums(to_end, kc, vc), None, weights.log_decay, per_chunk)
    leaving = pieces.leaving(sums(scale * from_start, qc, doc), None, weights.log_decay, per_chunk)
    return tables, entering, leaving, entering[:, :, ::plan.piece_len // chunk]


def chunk_terms(q, k, v, do, entering, leaving, tables: pieces_tokens.ChunkTables, *, chunk: int, scale: float):
    """The kernels' outputs in XLA, float32 at HIGHEST precision: {dq, dk [B, T, Dk]; a, net, b [B, H, T];
    across [B, H, T / C]} (the last: D_c = decay_c <S_c, G_c>)."""
    b, t, width = q.shape
    h = v.shape[2]
    n = t // chunk
    q, k, do, v = (x.astype(_F32) for x in (q, k, do, v))
    qc, kc = q.reshape(b, n, chunk, width), k.reshape(b, n, chunk, width)
    doc, vc = do.reshape(b, n, chunk, h, -1), v.reshape(b, n, chunk, h, -1)
    cum, q_side, k_side = (x.reshape(b, h, n, chunk) for x in (tables.cum, tables.q_side, tables.k_side))
    counts = tables.counts.reshape(b, n, chunk)
    keep = jnp.tril(jnp.ones((chunk, chunk), bool)) & (counts[..., :, None] == counts[..., None, :])
    gap = jnp.maximum(cum[..., :, None] - cum[..., None, :], 0.0)
    mm = functools.partial(jnp.einsum, precision="highest")
    p = jnp.where(keep[:, None], scale * jnp.exp(-gap) * mm("bnihe,bnjhe->bhnij", doc, vc), 0.0)
    q_inter = mm("bnihe,bhnde->bhnid", doc, entering)
    k_inter = mm("bnjhe,bhnde->bhnjd", vc, leaving)
    dq = mm("bhnij,bnjd->bnid", p, kc) + mm("bhni,bhnid->bnid", scale * q_side, q_inter)
    dk = mm("bhnij,bnid->bnjd", p, qc) + mm("bhnj,bhnjd->bnjd", k_side, k_inter)
    pairs = p * mm("bnid,bnjd->bnij", qc, kc)[:, None]
    rows = lambda x: x.reshape(b, h, t)  # noqa: E731
    return {"dq": dq.reshape(b, t, width), "dk": dk.reshape(b, t, width),
            "a": rows(scale * q_side * jnp.sum(q_inter * qc[:, None], axis=-1)),
            "net": rows(jnp.sum(pairs, axis=-1) - jnp.sum(pairs, axis=-2)),
            "b": rows(k_side * jnp.sum(k_inter * kc[:, None], axis=-1)),
            "across": q_side[..., -1] * jnp.sum(entering * leaving, axis=(-2, -1))}


def rates_grad(terms, chunk: int):
    """The rates' cotangent ds [B, T, H] float32 from chunk-local terms only (Mamba-2's SSD form):

        ds_u = -(A_u + sum_(t >= u) a_t + sum_(r < u) b_r + D_c)     (u in chunk c; t, r in c)

    the four kinds of pair (r < u <= t) that cross u: both in c (A_u = sum_(t >= u) sum_(r < u) W_tr, W = P o
    (Q K^T), which is the suffix sum of W's row sums minus its column sums, `chunk_terms`' net: the pairs with
    both ends at or after u cancel, within the chunk and in float32), from before c (a_t), to after c (b_r) and
    across all of c (D_c). No state term cancels another, so the states can be rounded (bf16) without the
    cross-chunk cancellation the walks' suffix sums need (pieces_tokens' docstring). The document masks and sides
    make every term 0 at a document start. terms: `chunk_terms`' (or the kernels')."""
    b, h, t = terms["a"].shape
    rows = (terms["a"] + terms["net"]).reshape(b, h, t // chunk, chunk)
    b_rows = terms["b"].reshape(b, h, t // chunk, chunk)
    suffix = jnp.flip(jnp.cumsum(jnp.flip(rows, -1), axis=-1), -1)
    prefix_b = jnp.cumsum(b_rows, axis=-1) - b_rows
    ds = -(suffix + prefix_b + terms["across"][..., None])
    return jnp.moveaxis(ds.reshape(b, h, t), 1, 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--t", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--dk", type=int, default=128)
    parser.add_argument("--dv", type=int, default=64)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--pieces", type=int, default=16, help="pieces of the states walk (a program per head each)")
    parser.add_argument("--configs", default="8:3,4:3", help="num_warps:num_stages of the dq and dk kernels, ...")
    parser.add_argument("--walks", default="4:3", help="num_warps:num_stages of the states walk, ...")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--check-t", type=int, default=4096, help="T of the checks against autodiff")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode; the checks only (CPU)")
    parser.add_argument("--out", default=".")
    args = parser.parse_args(argv)
    record = measure.provenance("benchmarks.chunk_dq_probe", sys.argv[1:] if argv is None else argv,
                                ("jax", "jaxlib", "jax-cuda13-plugin"))
    record |= {"device": jax.devices()[0].device_kind, "args": vars(args), "rows": []}
    path = os.path.join(args.out, "chunk_dq_probe.json")
    os.makedirs(args.out, exist_ok=True)

    def emit(row):
        print(row, flush=True)
        record["rows"].append(row)
        with open(path, "w") as f:
            json.dump(record, f, indent=1)

    scale = args.dk ** -0.5
    chunk = args.chunk

    def setup(t):
        keys = jax.random.split(jax.random.key(0), 5)
        q = jax.random.normal(keys[0], (1, t, args.dk), _F32).astype(_BF16)
        k = (jax.random.normal(keys[1], (1, t, args.dk), _F32) * scale).astype(_BF16)
        v, do = (jax.random.normal(key, (1, t, args.heads, args.dv), _F32).astype(_BF16) for key in keys[2:4])
        rates = jax.random.uniform(keys[4], (1, t, args.heads), _F32, 0.001, 0.1)
        ids = jnp.asarray(measure.random_documents(np.random.default_rng(0), 1, t, args.docs))
        starts = states.document_starts(ids)
        plan = pieces.Plan(chunk=chunk, pieces=args.pieces, piece_len=t // args.pieces, pad=0)
        made = jax.jit(functools.partial(chunk_states, plan=plan, scale=scale))(q, k, v, do, rates, starts)
        return (q, k, v, do, rates, ids), plan, made

    terms_of = jax.jit(functools.partial(chunk_terms, chunk=chunk, scale=scale))
    grad = jax.jit(functools.partial(rates_grad, chunk=chunk))
    kernels = {name: functools.partial(fn, chunk=chunk, scale=scale, interpret=args.interpret)
               for name, fn in (("dq", chunk_dq), ("dk", chunk_dk))}

    def bf16(x):
        return x.astype(_BF16)

    def formula_errors(inputs, tables, entering, leaving):
        """(autodiff's gradients, the oracles' terms on the bf16-rounded states, the errors of the oracles' dq, dk
        and rates' gradient against autodiff with float32 and with bf16-rounded states)."""
        q, k, v, do, rates, ids = inputs
        want = measure.fp32_reference(q[:, :, None], k[:, :, None], v, do, rates, scale, ids)[1]
        exact = terms_of(q, k, v, do, entering, leaving, tables)
        rounded = terms_of(q, k, v, do, bf16(entering).astype(_F32), bf16(leaving).astype(_F32), tables)
        return want, rounded, {"dq": measure.rel_err(exact["dq"], want[0][:, :, 0]),
                               "dk": measure.rel_err(exact["dk"], want[1][:, :, 0]),
                               "ds_f32_states": measure.rel_err(grad(exact), want[3]),
                               "ds_bf16_states": measure.rel_err(grad(rounded), want[3])}

    # the formulas against autodiff, then each kernel against its formula (the states in bf16 for both)
    inputs, plan, (tables, entering, leaving, pieces_in) = setup(args.check_t)
    q, k, v, do = inputs[:4]
    _, want, errs = formula_errors(inputs, tables, entering, leaving)
    emit({"check": "formulas vs autodiff", "t": args.check_t} | errs)
    dq, a, net = jax.jit(kernels["dq"])(q, k, do, v, bf16(entering), tables)
    dk, b_rows = jax.jit(kernels["dk"])(q, k, do, v, bf16(leaving), tables)
    walked = jax.jit(functools.partial(states_walk, plan=plan, interpret=args.interpret))(k, v, tables, pieces_in)
    got = {"dq": dq, "a": a, "net": net, "dk": dk, "b": b_rows}
    emit({"check": "kernels vs formulas", "t": args.check_t}
         | {name: measure.rel_err(x, want[name]) for name, x in got.items()}
         | {"ds": measure.rel_err(grad(got | {"across": want["across"]}), grad(want)),
            "states_walk": measure.rel_err(walked, entering)})
    if args.interpret:
        return 0

    # at the full shape: the rates' gradient's error, chunk-local against the library's default impl
    inputs, plan, (tables, entering, leaving, pieces_in) = setup(args.t)
    q, k, v, do, rates, ids = inputs
    want, _, errs = formula_errors(inputs, tables, entering, leaving)
    fwd, fwd_bwd = measure.fwd_and_fwd_bwd(functools.partial(_attend, scale=scale), grad_operands=1)
    q4, k4 = q[:, :, None], k[:, :, None]
    ds_library = fwd_bwd(q4, k4, v, do, rates, ids)[1][3]
    emit({"check": "rates' gradient vs autodiff", "t": args.t, "ds_library_auto": measure.rel_err(ds_library, want[3]),
          "ds_f32_states": errs["ds_f32_states"], "ds_bf16_states": errs["ds_bf16_states"]})
    del want, ds_library
    entering, leaving = bf16(entering), bf16(leaving)
    state_bytes = entering.size * entering.dtype.itemsize
    gbs = measure.copy_bandwidth_gbs(state_bytes, args.iters, args.reps)
    emit({"row": "state bytes", "gib": state_bytes / 2 ** 30, "copy_ms": state_bytes / gbs / 1e6, "copy_gbs": gbs})

    def timed(row, fn, *operands):
        try:
            emit(row | {"ms": measure.median_ms(jax.jit(fn), operands, args.iters, args.reps)})
        except Exception as e:  # a launch size that does not compile is a result too
            emit(row | {"error": repr(e)[:400]})

    for config in args.walks.split(","):
        warps, stages = map(int, config.split(":"))
        timed({"row": "states walk", "warps": warps, "stages": stages, "pieces": plan.pieces},
              functools.partial(states_walk, plan=plan, warps=warps, stages=stages), k, v, tables, pieces_in)
    for config in args.configs.split(","):
        warps, stages = map(int, config.split(":"))
        for name, chunk_s in (("dq", entering), ("dk", leaving)):
            timed({"row": f"chunk {name}", "warps": warps, "stages": stages},
                  functools.partial(kernels[name], warps=warps, stages=stages), q, k, do, v, chunk_s, tables)
    # the same GPU's anchor: the library's SSD layer on its default impl, forward and forward+backward
    emit({"row": "library layer", "impl": "auto",
          "fwd_ms": measure.median_ms(fwd, (q4, k4, v, rates, ids), args.iters, args.reps),
          "fwd_bwd_ms": measure.median_ms(fwd_bwd, (q4, k4, v, do, rates, ids), args.iters, args.reps)})
    return 0


def _attend(q, k, v, rates, ids, *, scale):
    return lasp_jax.linear_attention(q, k, v, rates, segment_ids=ids, scale=scale)


if __name__ == "__main__":
    sys.exit(main())
