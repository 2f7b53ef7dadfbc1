"""Probe: Mamba-2's dQ without a chunk chain (KERNEL_NOTES.md, session 26's plan), timed beside the walks.

    python3 -m benchmarks.chunk_dq_probe [--t 65536] [--heads 64] [--dk 128] [--dv 64] [--docs 16]
        [--configs 8:3:1,8:3:0] [--iters 10] [--reps 3] [--out DIR] [--interpret]

Why: in the Mamba-2 1.3B step the dQ and dK walks (one head per CTA, a serial chain of chunk steps each) take
89 ms each and their per-head shares' sums 27 ms more (TRAIN_GPU_NOTES.md, session 19). Under GVA (H output
heads reading one group's q = C and k = B), given the state S_(c,h) entering every chunk c of C rows,

    dq = (sum_h P_h) K + scale sum_h diag(q_side_h) dO_h S_h^T,   P_h = (dO_h V_h^T) o M_h,
    q . dq_h = rowsum(P_h o (Q K^T)) + rowsum(bf16(scale q_side_h q) o (dO_h S_h^T)),

so chunks are independent and the heads meet in two float32 accumulators, [C, C] and [C, Dk], not in per-head
[T, Dk] shares. This module holds one such kernel (Pallas, Triton lowering: one program per chunk looping over
the heads, several programs per SM to hide the dots' latency), an XLA oracle of the same formula and a timing
of it against the Mosaic walks' whole SSD layer on the same GPU. The states come as two bf16 operands (S =
hi + lo, as the dots walks split theirs), read from [B, H, T / C, Dk, Dv] arrays: 2 GiB a layer at Mamba-2
1.3B's shape, what the row "state bytes" prices at the copy bandwidth. It is a measurement, not a kernel of the
library: producing the states (a forward pass that writes them) and the dK mirror are not here.

Checks (printed, and in the JSON): the kernel against the XLA oracle of the formula, and the oracle's dq and
per-head dots against autodiff of lasp_jax's XLA path (float32, the per-head dq from q broadcast to every head),
so that a wrong formula fails, not only a wrong kernel. Writes DIR/chunk_dq_probe.json.
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


def _dq_kernel(q_ref, k_ref, do_ref, v_ref, hi_ref, lo_ref, cum_ref, side_ref, counts_ref, dq_ref, dots_ref, *,
               heads: int, scale: float, split: bool):
    """One chunk of C rows. Blocks: q, k [C, Dk]; do, v [C, H, Dv]; hi, lo [H, Dk, Dv]; cum, side [H, C];
    counts [C] int32; out dq [C, Dk] float32, dots [H, C] float32. Without split, lo is not read (the state
    is hi alone: what a design whose decay gradient needs no cross-chunk cancellation would read)."""
    q, k = q_ref[...], k_ref[...]
    c = q.shape[0]
    qk = jnp.dot(q, k.T, preferred_element_type=_F32)
    counts = counts_ref[...]
    rows = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
    keep = (rows >= jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)) & (counts[:, None] == counts[None, :])
    q32 = q.astype(_F32)

    def head(h, carry):
        scores_sum, state_sum = carry
        do, v = do_ref[:, h, :], v_ref[:, h, :]
        cum, side = cum_ref[h, :], side_ref[h, :]
        gap = jnp.maximum(cum[:, None] - cum[None, :], 0.0)
        p = jnp.where(keep, scale * jnp.exp(-gap) * jnp.dot(do, v.T, preferred_element_type=_F32), 0.0)
        inter = jnp.dot(do, hi_ref[h].T, preferred_element_type=_F32)
        if split:
            inter += jnp.dot(do, lo_ref[h].T, preferred_element_type=_F32)
        weight = scale * side
        rounded = kernel_support.rounded_to(weight[:, None] * q32, q.dtype)
        dots_ref[h, :] = jnp.sum(p * qk, axis=1) + jnp.sum(rounded * inter, axis=1)
        return scores_sum + p, state_sum + weight[:, None] * inter

    zeros = (jnp.zeros((c, c), _F32), jnp.zeros(q.shape, _F32))
    scores_sum, state_sum = jax.lax.fori_loop(0, heads, head, zeros)
    dq_ref[...] = jnp.dot(scores_sum.astype(k.dtype), k, preferred_element_type=_F32) + state_sum


def chunk_dq(q, k, do, v, hi, lo, tables: pieces_tokens.ChunkTables, *, chunk: int, scale: float, warps: int = 8,
             stages: int = 3, split: bool = True, interpret: bool = False):
    """(dq [B, T, Dk] float32 summed over heads, dots [B, H, T] float32: q . dq_h) of one group.

    q, k [B, T, Dk]; do, v [B, T, H, Dv]; hi, lo [B, H, T / C, Dk, Dv] (the state entering each chunk, S = hi +
    lo); tables as pieces_tokens.tables gives them for chunks of `chunk` rows."""
    b, t, dk = q.shape
    h, dv = v.shape[2:]
    row = pl.BlockSpec((None, chunk, dk), lambda i, c: (i, c, 0))
    heads_rows = pl.BlockSpec((None, chunk, h, dv), lambda i, c: (i, c, 0, 0))
    state = pl.BlockSpec((None, h, None, dk, dv), lambda i, c: (i, 0, c, 0, 0))
    table = pl.BlockSpec((None, h, chunk), lambda i, c: (i, 0, c))
    counts = pl.BlockSpec((None, chunk), lambda i, c: (i, c))
    return pl.pallas_call(
        functools.partial(_dq_kernel, heads=h, scale=scale, split=split),
        grid=(b, t // chunk),
        in_specs=[row, row, heads_rows, heads_rows, state, state, table, table, counts],
        out_specs=[row, table],
        out_shape=[jax.ShapeDtypeStruct((b, t, dk), _F32), jax.ShapeDtypeStruct((b, h, t), _F32)],
        compiler_params=pl_triton.CompilerParams(num_warps=warps, num_stages=stages),
        interpret=interpret,
    )(q, k, do, v, hi, lo, tables.cum, tables.q_side, tables.counts)


def chunk_states(q, k, v, do, rates, starts, chunk: int, scale: float):
    """(ChunkTables, the state entering each chunk S_c, the cotangent of the state leaving it G_c, both [B, H,
    T / C, Dk, Dv] float32) from rates [B, T, H] and starts [B, T] bool, through the piece driver's own tables and
    scans with one piece per chunk (zero S_in and end cotangent)."""
    b, t, h = rates.shape
    n = t // chunk
    plan = pieces.Plan(chunk=chunk, pieces=n, piece_len=chunk, pad=0)
    tables, weights = pieces_tokens.tables(jnp.moveaxis(rates, 1, 2), starts, plan)
    qc, kc = (x.reshape(b, n, chunk, -1).astype(_F32) for x in (q, k))
    vc, doc = (x.reshape(b, n, chunk, h, -1).astype(_F32) for x in (v, do))
    sums = functools.partial(jnp.einsum, "bhnc,bncd,bnche->bhnde", precision="highest")
    to_end, from_start = (w.reshape(b, h, n, chunk) for w in (weights.to_end, weights.from_start))
    entering = pieces.entering(sums(to_end, kc, vc), None, weights.log_decay, plan)
    leaving = pieces.leaving(sums(scale * from_start, qc, doc), None, weights.log_decay, plan)
    return tables, entering, leaving


def rates_grad(q, k, v, do, entering, leaving, tables: pieces_tokens.ChunkTables, *, chunk: int, scale: float):
    """The rates' cotangent ds [B, T, H] float32 from chunk-local terms only (Mamba-2's SSD form), in XLA:

        ds_u = -(A_u + sum_(t >= u) a_t + sum_(r < u) b_r + D_c)     (u in chunk c; t, r in c)

    the four kinds of pair (r < u <= t) that cross u: both in c (A_u = sum_(t >= u) sum_(r < u) P_tr (q_t . k_r),
    P the masked, decayed, scaled dO . v scores), from before c (a_t = scale q_side_t q_t . (dO_t S_c^T), the dQ
    kernel's row dots), to after c (b_r = k_side_r k_r . (v_r G_c^T), the dK mirror's) and across all of c (D_c =
    decay_c <S_c, G_c>). No term cancels another, so the states can be rounded (bf16) without the cross-chunk
    cancellation the walks' suffix sums need (pieces_tokens' docstring). The document masks and sides make every
    term 0 at a document start."""
    b, t, dk = q.shape
    h = v.shape[2]
    n = t // chunk
    q, k, do, v = (x.astype(_F32) for x in (q, k, do, v))
    qc, kc = q.reshape(b, n, chunk, dk), k.reshape(b, n, chunk, dk)
    doc, vc = do.reshape(b, n, chunk, h, -1), v.reshape(b, n, chunk, h, -1)
    cum, q_side, k_side = (x.reshape(b, h, n, chunk) for x in (tables.cum, tables.q_side, tables.k_side))
    counts = tables.counts.reshape(b, n, chunk)
    keep = jnp.tril(jnp.ones((chunk, chunk), bool)) & (counts[..., :, None] == counts[..., None, :])
    gap = jnp.maximum(cum[..., :, None] - cum[..., None, :], 0.0)
    mm = functools.partial(jnp.einsum, precision="highest")
    pairs = jnp.where(keep[:, None], scale * jnp.exp(-gap) * mm("bnihe,bnjhe->bhnij", doc, vc), 0.0)
    pairs *= mm("bnid,bnjd->bnij", qc, kc)[:, None]
    from_later = jnp.flip(jnp.cumsum(jnp.flip(pairs, -2), axis=-2), -2)  # [u, r]: sum over t >= u of pair (t, r)
    inside = jnp.sum(jnp.where(jnp.tri(chunk, k=-1, dtype=bool), from_later, 0.0), axis=-1)
    a = scale * q_side * mm("bnihe,bhnde,bnid->bhni", doc, entering, qc)
    b_rows = k_side * mm("bnjhe,bhnde,bnjd->bhnj", vc, leaving, kc)
    suffix_a = jnp.flip(jnp.cumsum(jnp.flip(a, -1), axis=-1), -1)
    prefix_b = jnp.cumsum(b_rows, axis=-1) - b_rows
    across = q_side[..., -1] * jnp.sum(entering * leaving, axis=(-2, -1))
    ds = -(inside + suffix_a + prefix_b + across[..., None])
    return jnp.moveaxis(ds.reshape(b, h, t), 1, 2)


def oracle(q, k, do, v, entering, tables: pieces_tokens.ChunkTables, *, chunk: int, scale: float):
    """The kernel's formula in XLA, float32 at HIGHEST precision from the float32 states: (dq, dots)."""
    b, t, dk = q.shape
    h = v.shape[2]
    n = t // chunk
    q, k, do, v = (x.astype(_F32) for x in (q, k, do, v))
    qc, kc = q.reshape(b, n, chunk, dk), k.reshape(b, n, chunk, dk)
    doc, vc = do.reshape(b, n, chunk, h, -1), v.reshape(b, n, chunk, h, -1)
    cum, side = (x.reshape(b, h, n, chunk) for x in (tables.cum, tables.q_side))
    counts = tables.counts.reshape(b, n, chunk)
    keep = jnp.tril(jnp.ones((chunk, chunk), bool)) & (counts[..., :, None] == counts[..., None, :])
    gap = jnp.maximum(cum[..., :, None] - cum[..., None, :], 0.0)
    mm = functools.partial(jnp.einsum, precision="highest")
    p = jnp.where(keep[:, None], scale * jnp.exp(-gap) * mm("bnihe,bnjhe->bhnij", doc, vc), 0.0)
    inter = mm("bnihe,bhnde->bhnid", doc, entering)
    dq_h = mm("bhnij,bnjd->bhnid", p, kc) + scale * side[..., None] * inter
    dots = jnp.einsum("bhnid,bnid->bhni", dq_h, qc).reshape(b, h, t)
    return dq_h.sum(axis=1).reshape(b, t, dk), dots


def autodiff_reference(q, k, v, do, rates, segment_ids, scale: float):
    """(dq summed over heads, q . dq_h [B, H, T]) by autodiff of lasp_jax's XLA path in float32, q and k
    broadcast to every head (so that q's gradient comes per head)."""
    h = v.shape[2]
    q4, k4 = (jnp.broadcast_to(x[:, :, None].astype(_F32), (*x.shape[:2], h, x.shape[-1])) for x in (q, k))
    attend = functools.partial(lasp_jax.linear_attention, segment_ids=segment_ids, scale=scale, impl="xla")
    with jax.default_matmul_precision("highest"):
        _, vjp = jax.vjp(lambda x: attend(x, k4, v.astype(_F32), rates), q4)
        (dq_h,) = vjp(do.astype(_F32))
    return dq_h.sum(axis=2), jnp.einsum("bthd,btd->bht", dq_h, q4[:, :, 0])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--t", type=int, default=65536)
    parser.add_argument("--heads", type=int, default=64)
    parser.add_argument("--dk", type=int, default=128)
    parser.add_argument("--dv", type=int, default=64)
    parser.add_argument("--docs", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--configs", default="4:2:1,8:2:1,8:3:1,8:3:0",
                        help="comma-separated num_warps:num_stages:split (1: S = hi + lo, 0: hi alone) to time")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--check-t", type=int, default=4096, help="T of the autodiff check (XLA, float32)")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode, no timing (CPU)")
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

    def inputs(t):
        keys = jax.random.split(jax.random.key(0), 5)
        q = jax.random.normal(keys[0], (1, t, args.dk), _F32).astype(_BF16)
        k = (jax.random.normal(keys[1], (1, t, args.dk), _F32) * scale).astype(_BF16)
        v, do = (jax.random.normal(key, (1, t, args.heads, args.dv), _F32).astype(_BF16) for key in keys[2:4])
        rates = jax.random.uniform(keys[4], (1, t, args.heads), _F32, 0.001, 0.1)
        ids = jnp.asarray(measure.random_documents(np.random.default_rng(0), 1, t, args.docs))
        return q, k, v, do, rates, ids

    def states(q, k, v, do, rates, ids):
        starts = jnp.pad(ids[:, 1:] != ids[:, :-1], ((0, 0), (1, 0)))
        return jax.jit(functools.partial(chunk_states, chunk=args.chunk, scale=scale))(q, k, v, do, rates, starts)

    grad = jax.jit(functools.partial(rates_grad, chunk=args.chunk, scale=scale))

    def rates_grad_errors(q, k, v, do, rates, ids, tables, entering, leaving):
        """The chunk-local ds against autodiff in float32, with float32 and with bf16-rounded states."""
        want = measure.fp32_reference(q[:, :, None], k[:, :, None], v, do, rates, scale, ids)[1][3]
        rounded = (x.astype(_BF16).astype(_F32) for x in (entering, leaving))
        return want, {"ds_f32_states": measure.rel_err(grad(q, k, v, do, entering, leaving, tables), want),
                      "ds_bf16_states": measure.rel_err(grad(q, k, v, do, *rounded, tables), want)}

    # the formulas against autodiff (XLA, float32), then the kernel against its formula
    q, k, v, do, rates, ids = inputs(args.check_t)
    tables, entering, leaving = states(q, k, v, do, rates, ids)
    want = autodiff_reference(q, k, v, do, rates, ids, scale)
    formula = oracle(q, k, do, v, entering, tables, chunk=args.chunk, scale=scale)
    emit({"check": "formulas vs autodiff", "t": args.check_t, "dq": measure.rel_err(formula[0], want[0]),
          "dots": measure.rel_err(formula[1], want[1])}
         | rates_grad_errors(q, k, v, do, rates, ids, tables, entering, leaving)[1])
    hi = entering.astype(_BF16)
    lo = (entering - hi.astype(_F32)).astype(_BF16)
    got = jax.jit(functools.partial(chunk_dq, chunk=args.chunk, scale=scale, interpret=args.interpret))(
        q, k, do, v, hi, lo, tables)
    emit({"check": "kernel vs formula", "t": args.check_t,
          "dq": measure.rel_err(got[0], formula[0]), "dots": measure.rel_err(got[1], formula[1])})
    if args.interpret:
        return 0

    # at the full shape: the rates' gradient's error, chunk-local against the library's default impl
    q, k, v, do, rates, ids = inputs(args.t)
    tables, entering, leaving = states(q, k, v, do, rates, ids)
    want, errs = rates_grad_errors(q, k, v, do, rates, ids, tables, entering, leaving)
    del leaving
    fwd, fwd_bwd = measure.fwd_and_fwd_bwd(functools.partial(_attend, scale=scale), grad_operands=1)
    q4, k4 = q[:, :, None], k[:, :, None]
    ds_library = fwd_bwd(q4, k4, v, do, rates, ids)[1][3]
    emit({"check": "rates' gradient vs autodiff", "t": args.t, "ds_library_auto": measure.rel_err(ds_library, want)}
         | errs)
    del want, ds_library
    hi = entering.astype(_BF16)
    lo = (entering - hi.astype(_F32)).astype(_BF16)
    del entering
    state_bytes = 2 * hi.size * hi.dtype.itemsize
    gbs = measure.copy_bandwidth_gbs(state_bytes, args.iters, args.reps)
    emit({"row": "state bytes", "gib": state_bytes / 2 ** 30, "read_ms_at_copy_bandwidth": state_bytes / gbs / 1e6,
          "copy_gbs": gbs})
    for config in args.configs.split(","):
        warps, stages, split = map(int, config.split(":"))
        fn = jax.jit(functools.partial(chunk_dq, chunk=args.chunk, scale=scale, warps=warps, stages=stages,
                                       split=bool(split)))
        row = {"row": "chunk dq", "warps": warps, "stages": stages, "split": bool(split)}
        try:
            emit(row | {"ms": measure.median_ms(fn, (q, k, do, v, hi, lo, tables), args.iters, args.reps)})
        except Exception as e:  # a launch size that does not compile is a result too
            emit(row | {"error": repr(e)[:400]})
    # the same GPU's anchor: the library's SSD layer on its default impl, forward and forward+backward
    emit({"row": "library layer", "impl": "auto", "fwd_ms": measure.median_ms(fwd, (q4, k4, v, rates, ids),
                                                                               args.iters, args.reps),
          "fwd_bwd_ms": measure.median_ms(fwd_bwd, (q4, k4, v, do, rates, ids), args.iters, args.reps)})
    return 0


def _attend(q, k, v, rates, ids, *, scale):
    return lasp_jax.linear_attention(q, k, v, rates, segment_ids=ids, scale=scale)


if __name__ == "__main__":
    sys.exit(main())
