"""Impl "pallas_mosaic": the chunk walks of the fused kernels (output, dQ, dK, dV) as one Mosaic GPU (Hopper)
kernel, with `pallas_triton`'s state passes, driven by `lasp_jax.ops.pieces`.

Why: `pallas_triton`'s walks tile a head dim by 64 because whole 128 x 128 fp32 states were slower in the
Triton lowering, and each tile then re-reads the inputs every tile needs (the output pass reads Q and K twice:
6 tensor-equivalents of HBM traffic for a pass whose floor is 4; benchmarks/results/KERNEL_NOTES.md). Here one
CTA per (batch, head, piece) holds the WHOLE state, split by columns over two compute warpgroups (each owns
S[:, Dz/2 columns] as a wgmma accumulator in registers; paired heads below: a head's whole state each), while a
third warpgroup streams the chunks of X, Y and Z into a ring of shared-memory stages with TMA. Every input is read
from HBM once per CTA.

All four walks are one product with other roles (`walk`). Per chunk of C rows (i: row of X and out, j: row
of Y and Z), forward (chunks first to last, S entering at the piece's start):

    out = [(X Y^T) * M] Z + a lambda^i X S,        M[i, j] = scale lambda^(i - j) (i >= j), else 0 (selected)
    S  <- lambda^C S + b Y^T (lambda^(C - j) Z)

and reverse (chunks last to first, S entering at the piece's end):

    out = [(X Y^T) * M^T] Z + a lambda^(C - i) X S,  M^T[i, j] = scale lambda^(j - i) (j >= i), else 0
    S  <- lambda^C S + b Y^T (lambda^j Z)

with (a, b) = (scale, 1), or (1, scale) when `scale_update`; so that o = walk(Q, K, V, S), dQ = walk(dO, V,
K, S^T), dV = walk(K, Q, dO, dS, reverse, scale_update) and dK = walk(V, dO, Q, dS^T, reverse, scale_update),
with S the state entering each piece and dS the cotangent of the state leaving it (the attention's scale
multiplies every score and the q side of every state term: the output's in o and dQ, the dS update's in dV and
dK). In the
kernel, warpgroup w owns columns cols_w of Z, S and out, and each chunk issues two pairs of wgmma: (X Y^T,
X S_w), during which Z_w is decayed into shared memory, then (the intra product with Z_w, the state update with
A = Y^T, a transposed shared-memory operand), both accumulating from their initial values (pl.run_state). The
decayed scores reach their wgmma through shared memory; S_w's bf16 copy, the B operand of the next chunk's
X S_w, is written to shared memory.

Numerics: bf16 operands, float32 accumulation and state, as in `pallas_triton`: the state is rounded to bf16 only
as a matmul operand, the decayed scores once; the scale rides on the float32 mask and decay rows, never on the bf16
inputs. The mask selects: a non-finite score after the diagonal is dropped, not multiplied by zero. One difference:
the state update's decay is applied to Z's rows (each warpgroup scales its own columns), while the Triton output
and dV passes scale the other factor's rows (K, Q), so there the decay's bf16 rounding falls on the other factor
(the same product in exact arithmetic): o and dV differ from the Triton kernels' by about a bf16 rounding, dQ and
dK round alike (measured up to 3.1e-3 and below 1e-4 relative, tests/ops/test_pallas_mosaic.py). Powers of lambda
are exp(-s * n) with n >= 0 (the fast approximate exp: Config.approx_math).

Per-token decay and documents (`token_walk`, driven by `lasp_jax.ops.pieces_tokens`): the same kernel under a
static flag (the constant walks trace exactly as before and load nothing more), with the decay of each chunk read
from the float32 `pieces_tokens.ChunkTables` (bc the chunk-local running sum, counts, q_side, k_side), staged by
TMA beside X, Y and Z. Forward:

    out = [(X Y^T) * M] Z + scale q_side_i X S,   M[i, j] = scale exp(-max(bc_i - bc_j, 0)) where i >= j and
    S  <- q_side_(C-1) S + Y^T (k_side_j Z)       counts_i == counts_j, else 0 (selected)

and reverse: M^T, k_side on the output's state term, scale q_side_j on the update. M is formed per chunk in
float32 while the scores' wgmma runs, and its exponent is selected to 0 outside the kept pairs, so no exp of a
positive number is taken and a non-finite score of another document or a later row is dropped (the state terms
are products: a non-finite row still reaches the chunks after it through the state). The dQ and dK walks also
return each row's float32 q . dq and k . dk (`dots_with`: the decay gradient's terms). Every pair term that crosses a
chunk boundary enters one of them through the state operand and the other through the other walk's update rows,
and must cancel in the decay gradient's sums as in exact arithmetic (`pallas_triton._dq_kernel`'s docstring says
how they otherwise grow with the piece's length), so these two walks take the state as two bf16 operands, S_w
and its residual S_w - bf16(S_w) (a second wgmma into the same accumulator), and form each row's state part of
the dot from bf16(out_rows w), the rows the other walk rounds for its update; the rest of the dot from the
float32 output row. At d=128 the tables' stages take the output's staging buffer (227 KB per CTA), so the output
leaves through the decayed-Z buffer once the update's wgmma has read it. Measured against a float64 oracle of the
walks: 2.1e-3 to 2.5e-3 relative (the bf16 rounding as above; tests/ops/test_pallas_mosaic_tokens.py).

Paired heads (`_pairs`, Config.pair_heads): where two output heads read one head of X and of Y and Z has 64
columns per head (Mamba-2's output and dV walks: X, Y the group's C and B), one CTA walks the pair, warpgroup w
owning head 2i + w whole, with its own decay. At a Mamba-2 1.3B SSD layer on an H200 (T = 64K, 64 heads, one
group, 16 documents) forward 1.888 ms against 2.251 with a CTA per head, forward+backward 8.348 against 8.954
(benchmarks/results/walks_gpu_h200_s12.md); interpreted, the outputs are the same bits or, on some CPUs, one bf16
rounding apart in a few elements (the interpreter's dots of other shapes sum in another order). The dQ and dK walks
(X per head) stay a CTA per head: both ways of pairing them tried lost on an H200 (KERNEL_NOTES.md, sessions 15 and
21; with Z shared, a warpgroup's whole [64, Dz] state, output and w spill registers).

Scope: bf16, head dims Dk and Dv of 64 or 128, equal or not (a walk's X and Y share one head dim, Z and the output
the other: the state is [Dx, Dz], split by Z's columns; Mamba-2's Dk 128, Dv 64), every head layout of
`checks.attention_inputs` (the grid has one CTA row per output head h of H = max(Hq, Hv), or per pair of them, and
each of X, Y, Z is read at its own operand's head h // (H / Hx): GQA/MQA and GVA heads are indexed, never repeated;
a walk's output is per output head, so where an input has fewer heads than H its gradient comes as one bf16 share
per output head, which `pieces.backward` sums in float32), T a whole number of pieces and pieces a whole number of
chunks (what `pieces` hands its walks after padding); Hopper only (wgmma, TMA; `supported`; which Hopper parts, head
dims and head layouts are qualified is `lasp_jax.ops.impls`'s). `Walks(interpret=True)` runs the kernels in Mosaic
GPU's CPU interpreter and the state passes in Pallas interpret mode (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from lasp_jax.ops import kernel_support, pallas_triton, pieces, pieces_tokens

_F32 = jnp.float32
_COMPUTE_WGS = 2  # compute warpgroups; each owns half the columns of the state
_SMEM_BYTES = 227 * 1024  # shared memory a Hopper CTA may take
HEAD_DIMS = (64, 128)  # Dk and Dv (equal or not): what the kernel is written for and tested on (interpreted)


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes and launch parameters.

    chunk: rows per chunk (the wgmma M of the intra-chunk products; a multiple of 64). stages: shared-memory
    ring depth of the X, Y, Z chunk loads (each stage holds 3 x chunk x 128 bf16 = 48 KB at C = 64; Hopper
    offers 227 KB per CTA, of which the bf16 state copies (32 KB), the decayed scores and the decayed Z
    columns (16 KB each) and the output staging (16 KB) take 80 KB: 3 stages fit, 4 do not; the per-token dQ and
    dK walks' residual state operand leaves 2 at Dx = Dz = 128: `_ring` takes the deepest ring up to stages
    that fits, and gives the dots walks' w rows a ring of their own where that costs no stage). compute_registers,
    memory_registers: per-thread register budgets of the compute and the TMA warpgroups (setmaxnreg).
    approx_math: fast approximate exp (on: the walks' GPU tests passed with it on an H200, and a Mamba-2 1.3B SSD
    layer took 7.731 ms forward+backward against 8.035 without, its errors unchanged; KERNEL_NOTES.md, sessions
    13-14). pair_heads: where two output heads share X and Y (GVA, MQA) and Z has a head per output head of 64
    columns (Mamba-2's output and dV walks), one CTA walks both heads, a head per compute warpgroup (`_pairs`).
    """

    chunk: int = 64
    stages: int = 3
    compute_registers: int = 232
    memory_registers: int = 40
    approx_math: bool = True
    pair_heads: bool = True


DEFAULT = Config()


def _mma_transforms(cols: int, dtype) -> tuple:
    """Tiling and swizzle that wgmma accepts for a bf16 operand whose rows are `cols` wide."""
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _accumulate(inits, issue, interpret: bool):
    """inits + what issue(accs) adds to wgmma accumulators accs (one per init), as arrays.

    On a GPU the accumulators start from inits (pl.run_state, which also awaits the wgmmas). Mosaic GPU's
    interpreter (jax 0.11.2) interprets neither pl.run_state nor stores into an accumulator, so there the
    accumulators start from zero and inits are added after: the same sums, one rounding apart in float32.
    """
    if not interpret:
        return pl.run_state(issue)(tuple(plgpu.ACC.init(x) for x in inits))

    def from_zero(*accs):
        issue(accs)
        return tuple(acc[...] for acc in accs)

    sums = pl.run_scoped(from_zero, *(plgpu.ACC(x.shape, x.dtype) for x in inits))
    return tuple(x + y for x, y in zip(inits, sums))


_ROWS = plgpu.Layout.WGMMA.reduce(1)  # a vector along the rows of a WGMMA-layout [C, N] array
_COLS = plgpu.Layout.WGMMA.reduce(0)  # a vector along its columns


def _iotas(c: int):
    """Row and column indices of a [C, C] WGMMA-layout array."""
    return tuple(plgpu.broadcasted_iota(jnp.int32, (c, c), axis, layout=plgpu.Layout.WGMMA) for axis in (0, 1))


def _load_rows(ref):
    """A chunk's table column [C] from shared memory, one value per row of a WGMMA-layout array."""
    return plgpu.load(ref, layout=_ROWS, optimized=False)


def _rows(vec, cols: int):
    """vec [C] (the rows' layout) broadcast along `cols` columns."""
    return lax.broadcast_in_dim(vec, (vec.shape[0], cols), [0])


def _token_chunk(cum_rows, cum_cols, count_rows, count_cols, causal, reverse: bool, scale: float):
    """One chunk's pair weights from its tables (shared-memory refs [C] of `ChunkTables`' cum and counts, each
    staged twice: Mosaic GPU loads one shared-memory ref in one layout only). Returns keep [C, C] (the walk's
    mask: causal and in one document) and weights [C, C] float32 scale exp(-max(bc_i - bc_j, 0)) (scale at the
    pairs not kept, whose exponent is selected to 0). Rows are X's positions, columns Y's (and Z's): the mask
    transposes in reverse. Every exponent is <= 0 (bc is a running sum of rates >= 0, so bc_i - bc_j >= 0 at a
    kept pair up to the rounding of two sums, which the max absorbs)."""
    c = causal.shape[0]

    def along_rows(ref):
        return lax.broadcast_in_dim(_load_rows(ref), (c, c), [0])

    def along_cols(ref):
        return lax.broadcast_in_dim(plgpu.load(ref, layout=_COLS, optimized=False), (c, c), [1])

    bc_rows, bc_cols = along_rows(cum_rows), along_cols(cum_cols)
    keep = causal & (along_rows(count_rows) == along_cols(count_cols))
    gap = bc_cols - bc_rows if reverse else bc_rows - bc_cols
    return keep, scale * jnp.exp(-jnp.where(keep, jnp.maximum(gap, 0.0), 0.0))


def _kernel(*refs, c, piece_len, stages, reverse, scale, scale_update, groups, pair, config, interpret, tokens,
            dots, stage_w):
    """One CTA: (batch, output head, piece) of the grid; warpgroups 0 and 1 compute, warpgroup 2 loads. groups:
    output heads per head of x, y, z (and w) (GQA, GVA: output head h reads head h // group, never a repeated
    copy). pair: 2 where each grid head is a pair of output heads (`_pairs`: the decay inputs carry the pair's
    heads on an axis of 2, warpgroup w takes head w of it and head 2h + w of states_in), else 1 (both
    warpgroups take the one head's decay).

    refs: the decay's inputs (rates [H], or with `tokens` the four `ChunkTables`), x, y, z, states_in, (with
    `dots`: w), out, (with dots: the dots' shares), then the scratch: shared memory (the output's staging, or with
    tokens the six table stages in its place; with dots the residual operand and the dots' staging, then with
    `stage_w` w's stages), the load barriers (with tokens, the tables' after X's, Y's and Z's; with stage_w,
    w's last) and the consumed barriers. stage_w: w's chunks come by TMA into a ring of their own, else each
    chunk's rows are loaded from HBM into registers (where that ring would cost a stage of X, Y and Z)."""
    n_decay = len(pieces_tokens.ChunkTables._fields) if tokens else 1
    x_ref, y_ref, z_ref, states_ref, *rest = refs[n_decay:]
    if dots:
        w_ref, out_ref, dots_ref, smem, loaded, consumed = rest
        if stage_w:
            *smem, s_low_smem, dots_smem, w_smem = smem
            *loaded, w_bar = loaded
        else:
            *smem, s_low_smem, dots_smem = smem
    else:
        out_ref, smem, loaded, consumed = rest
    x_smem, y_smem, z_smem, s_smem, scores_smem, zw_smem, last = smem
    # With tokens the table stages take the output's staging buffer, whose rows go through zw_smem instead
    # (a Hopper CTA's 227 KB hold one or the other at d=128 and 3 stages; the dots walks' 2 at d=128).
    out_smem, table_smem = (zw_smem, last) if tokens else (last, None)
    x_bar, y_bar, z_bar = loaded[:3]
    b, h, p = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("p")
    wg = lax.axis_index("wg")
    own = wg if pair == 2 else 0  # this warpgroup's head on the decay inputs' pair axis
    n_chunks = piece_len // c
    start = p * piece_len
    half = z_ref.shape[-1] // _COMPUTE_WGS

    def chunk(n):
        """The piece's chunk walked n-th: chunks in the walk's direction."""
        return n_chunks - 1 - n if reverse else n

    def rows(n):
        """The rows of the n-th chunk walked."""
        return pl.ds(start + chunk(n) * c, c)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(config.compute_registers, action="increase")
        cols = pl.ds(wg * half, half)
        if tokens:
            # The decays come per chunk, from the tables' stages (`_token_chunk`); only the causal part of the
            # mask is the same in every chunk.
            q_side_ref = refs[2]
            idx, jdx = _iotas(c)
            causal = jdx >= idx if reverse else idx >= jdx
        else:
            rate = refs[0][h, own]
            # Decay tables, computed once: powers exp(-s n) with n >= 0 only. Reverse transposes the mask and
            # swaps the two row decays (the state enters at the chunk's end and leaves at its start).
            idx, jdx = _iotas(c)
            gap = (jdx - idx if reverse else idx - jdx).astype(_F32)
            keep = gap >= 0
            mask = scale * jnp.exp(-rate * jnp.maximum(gap, 0.0))
            i = plgpu.broadcasted_iota(jnp.int32, (c,), 0, layout=plgpu.Layout.WGMMA.reduce(1)).astype(_F32)
            from_start = lax.broadcast_in_dim(jnp.exp(-rate * i), (c, half), [0])
            from_end = lax.broadcast_in_dim(jnp.exp(-rate * (c - i)), (c, half), [0])
            out_decay, z_decay = (from_end, from_start) if reverse else (from_start, from_end)
            if scale_update:
                z_decay = scale * z_decay
            else:
                out_decay = scale * out_decay
            chunk_decay = jnp.exp(-rate * c)

        # Straight from HBM into registers, once per CTA (unoptimized: Mosaic GPU's fast path is for SMEM).
        # Paired, states_in keeps a head per output head: this warpgroup's head, whole.
        state_at = states_ref.at[b, 2 * h + wg, p] if pair == 2 else states_ref.at[b, h, p, :, cols]
        state = plgpu.load(state_at, layout=plgpu.Layout.WGMMA, optimized=False)

        def state_operands(state):
            """S_w in bf16 for the next chunk's X S_w; with dots also its residual S_w - bf16(S_w)."""
            s_smem[wg] = state.astype(s_smem.dtype)
            if dots:
                s_low_smem[wg] = (state - kernel_support.rounded_to(state, s_smem.dtype)).astype(s_smem.dtype)

        state_operands(state)
        plgpu.commit_smem()

        def body(n, state):
            slot = lax.rem(n, stages)
            if tokens:
                # The chunk's decay is q_side at its last position. Issued before the waits: the wgmma pair
                # below hides this load's latency.
                this_decay = q_side_ref[b, h, own, start + chunk(n) * c + c - 1]
                plgpu.barrier_wait(loaded[3].at[slot])
            if dots and not stage_w:  # straight from HBM into registers, early: used once the output rows are done
                w = plgpu.load(w_ref.at[b, rows(n), h // groups[3], cols], layout=plgpu.Layout.WGMMA, optimized=False)
            plgpu.barrier_wait(x_bar.at[slot])
            plgpu.barrier_wait(y_bar.at[slot])
            plgpu.barrier_wait(z_bar.at[slot])
            x, y, z = x_smem.at[slot], y_smem.at[slot], z_smem.at[slot]

            def scores_and_inter(scores_acc, inter_acc):
                plgpu.wgmma(scores_acc, x, y.transpose((1, 0)))
                plgpu.wgmma(inter_acc, x, s_smem.at[wg])
                if dots:
                    plgpu.wgmma(inter_acc, x, s_low_smem.at[wg])
                # While the tensor cores work: the state update's B operand, this warpgroup's columns of Z
                # with their rows decayed (with tokens, also the chunk's mask, applied here).
                if tokens:
                    cum_rows, cum_cols, count_rows, count_cols, q_side, k_side = _stage(table_smem, slot, own)
                    z_rows = scale * _load_rows(q_side) if reverse else _load_rows(k_side)
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's rows have left zw_smem
                    zw_smem[wg] = (z.at[:, cols][...].astype(_F32) * _rows(z_rows, half)).astype(zw_smem.dtype)
                    keep, weights = _token_chunk(cum_rows, cum_cols, count_rows, count_cols, causal, reverse, scale)
                    return jnp.where(keep, scores_acc[...] * weights, 0.0), inter_acc[...]
                zw_smem[wg] = (z.at[:, cols][...].astype(_F32) * z_decay).astype(zw_smem.dtype)
                return scores_acc[...], inter_acc[...]

            scores, inter = pl.run_scoped(scores_and_inter, plgpu.ACC((c, c), _F32), plgpu.ACC((c, half), _F32))
            if tokens:
                scores_smem[wg] = scores.astype(scores_smem.dtype)
                plgpu.commit_smem()
                q_side, k_side = _stage(table_smem, slot, own)[4:]
                out_rows = _rows(_load_rows(k_side) if reverse else scale * _load_rows(q_side), half)
                inits = (out_rows * inter, this_decay * state)
            else:
                scores_smem[wg] = jnp.where(keep, scores * mask, 0.0).astype(scores_smem.dtype)
                plgpu.commit_smem()
                inits = (out_decay * inter, chunk_decay * state)

            def intra_and_update(accs):
                out_acc, state_acc = accs
                plgpu.wgmma(out_acc, scores_smem.at[wg], z.at[:, cols])
                plgpu.wgmma(state_acc, y.transpose((1, 0)), zw_smem.at[wg])

            out, state = _accumulate(inits, intra_and_update, interpret)
            if not stage_w:  # else the slot is released once w's rows are read from it, below
                plgpu.barrier_arrive(consumed.at[slot])
            state_operands(state)

            if not tokens:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's rows have left out_smem
            out_smem[wg] = out.astype(out_smem.dtype)
            if dots:  # this warpgroup's share of each row's out . w, the state part from the rounded rows
                if stage_w:
                    plgpu.barrier_wait(w_bar.at[slot])
                    w = plgpu.load(w_smem.at[slot].at[:, cols], layout=plgpu.Layout.WGMMA)
                    plgpu.barrier_arrive(consumed.at[slot])
                w = w.astype(_F32)
                rounded = kernel_support.rounded_to(w * out_rows, w_ref.dtype)
                dots_smem[wg] = jnp.sum(out * w + inter * (rounded - w * out_rows), axis=1)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem.at[wg], out_ref.at[b, rows(n), h, cols])
            if dots:
                plgpu.copy_smem_to_gmem(dots_smem.at[wg], dots_ref.at[b, h, wg, rows(n)])
            return state

        # Under shard_map a value loaded from a ref carries the manual axes it varies over, while values the
        # kernel computes do not (kernels are traced without vma checks): the chunk loop's carry starts as a
        # computed value so that its type does not change across the loop.
        lax.fori_loop(0, n_chunks, body, state * 1.0)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(config.memory_registers, action="decrease")

        def load(n, slot):
            plgpu.copy_gmem_to_smem(x_ref.at[b, rows(n), h // groups[0]], x_smem.at[slot], x_bar.at[slot])
            plgpu.copy_gmem_to_smem(y_ref.at[b, rows(n), h // groups[1]], y_smem.at[slot], y_bar.at[slot])
            plgpu.copy_gmem_to_smem(z_ref.at[b, rows(n), h // groups[2]], z_smem.at[slot], z_bar.at[slot])
            if stage_w:
                plgpu.copy_gmem_to_smem(w_ref.at[b, rows(n), h // groups[3]], w_smem.at[slot], w_bar.at[slot])
            if tokens:  # one barrier awaits the tables' copies (cum and counts twice: `_token_chunk`)
                counts = refs[1].at[b, rows(n)]
                for i in (2, 3):
                    plgpu.copy_gmem_to_smem(counts, table_smem[i].at[slot], loaded[3].at[slot])
                for j in range(pair):
                    cum, q_side, k_side = (ref.at[b, h, j, rows(n)] for ref in (refs[0], refs[2], refs[3]))
                    for src, i in zip((cum, cum, q_side, k_side), (0, 1, 4, 5)):
                        plgpu.copy_gmem_to_smem(src, table_smem[i].at[slot, j], loaded[3].at[slot])

        for slot in range(stages):
            load(slot, slot)

        @pl.loop(stages, n_chunks)
        def _(n):
            slot = lax.rem(n, stages)
            plgpu.barrier_wait(consumed.at[slot])
            load(n, slot)

        # Observe the last chunks' releases too, so that every barrier phase is awaited before the CTA ends
        # (the interpreter checks it; on the GPU it only delays this idle warpgroup's exit).
        @pl.loop(max(0, n_chunks - stages), n_chunks)
        def _(n):
            plgpu.barrier_wait(consumed.at[lax.rem(n, stages)])


def _stage(table_smem, slot, own):
    """The six table refs [C] of stage `slot` (cum, cum, counts, counts, q_side, k_side), the per-head ones at
    head `own` of their pair axis."""
    return tuple(t.at[slot] if i in (2, 3) else t.at[slot, own] for i, t in enumerate(table_smem))


def _check_tables(tables, batch_heads: tuple[int, int], t: int):
    """Raises ValueError unless `tables` are ChunkTables of the shapes and dtypes `token_walk` reads."""
    b, h = batch_heads
    if not isinstance(tables, pieces_tokens.ChunkTables):
        raise ValueError(f"tables must be a pieces_tokens.ChunkTables, got {type(tables).__name__}")
    want = {"cum": ((b, h, t), _F32), "counts": ((b, t), jnp.int32), "q_side": ((b, h, t), _F32),
            "k_side": ((b, h, t), _F32)}
    for name, (shape, dtype) in want.items():
        a = getattr(tables, name)
        if a.shape != shape or jnp.dtype(a.dtype) != jnp.dtype(dtype):
            raise ValueError(f"tables.{name} {a.shape} {a.dtype}: expected {shape} {jnp.dtype(dtype)}")


def _check(x, y, z, states_in, piece_len: int, config: Config) -> int:
    """Raises ValueError on inputs `walk` does not take; returns the piece count."""
    b, t, _, dx = x.shape
    dz = z.shape[-1] if z.ndim == 4 else None
    h = states_in.shape[1]
    c = config.chunk
    for a, d in ((x, dx), (y, dx), (z, dz)):
        if a.ndim != 4 or (a.shape[0], a.shape[1], a.shape[3]) != (b, t, d) or h % a.shape[2]:
            raise ValueError(f"x {x.shape}, y {y.shape}, z {z.shape}, states_in {states_in.shape}: need x, y "
                             f"[B, T, Hx, Dx] and z [B, T, Hz, Dz], Dx and Dz in {HEAD_DIMS}, each head count "
                             "dividing the H of states_in")
    for d in (dx, dz):
        if d not in HEAD_DIMS:
            raise ValueError(f"head dim {d}: this kernel takes head dims of {HEAD_DIMS}")
    if {jnp.dtype(a.dtype) for a in (x, y, z)} != {jnp.dtype(jnp.bfloat16)}:
        raise ValueError(f"x, y, z must be bfloat16; got {x.dtype}, {y.dtype}, {z.dtype}")
    if c % 64 or piece_len <= 0 or piece_len % c or t % piece_len:
        raise ValueError(f"T={t}, piece_len={piece_len}, chunk={c}: need chunk % 64 == 0, piece_len % chunk == 0 "
                         "and T % piece_len == 0")
    pieces = t // piece_len
    if states_in.shape != (b, h, pieces, dx, dz):
        raise ValueError(f"states_in {states_in.shape}: expected {(b, h, pieces, dx, dz)}")
    return pieces


def walk(x, y, z, rates, states_in, piece_len: int, *, reverse: bool, scale: float = 1.0,
         scale_update: bool = False, config: Config = DEFAULT, interpret: bool = False):
    """One chunk walk per (batch, head, piece), as one Mosaic GPU kernel (the module docstring's formulas).

    Args:
      x, y [B, T, Hx, Dx], z [B, T, Hz, Dz] bf16 (x and y with their own head counts), Dx and Dz in HEAD_DIMS,
      each head count dividing H (output head h reads head h // (H / Hx) of each: GQA and GVA without copies);
      rates [H] float32 (lambda = exp(-rate)); states_in [B, H, P, Dx, Dz] float32, the state entering each
      piece of piece_len positions in the walk's direction (at its start, or its end when reverse; T = P *
      piece_len, piece_len a multiple of config.chunk).
      reverse: walk each piece's chunks last to first with the transposed mask and the mirrored decays.
      scale: a static float multiplying the mask, and the output's state term or (scale_update) the state's
      update. interpret: run in Mosaic GPU's CPU interpreter (tests; slow).
    Returns:
      out [B, T, H, Dz] bf16.
    """
    pieces = _check(x, y, z, states_in, piece_len, config)
    return _launch((rates.astype(_F32),), x, y, z, states_in, piece_len, pieces, reverse=reverse, scale=scale,
                   scale_update=scale_update, config=config, interpret=interpret, tokens=False)


def token_walk(x, y, z, tables: pieces_tokens.ChunkTables, states_in, piece_len: int, *, reverse: bool,
               scale: float = 1.0, dots_with=None, config: Config = DEFAULT, interpret: bool = False):
    """`walk` under per-token decay and documents: the decays come from the chunks' `pieces_tokens.ChunkTables`
    (the module docstring's token formulas), one Mosaic GPU kernel like `walk`'s with the tables streamed beside
    X, Y and Z.

    Args:
      x, y, z, states_in, piece_len, reverse, config, interpret: as `walk`'s (T padded to whole pieces, the
      tables over the same T, chunks of config.chunk).
      tables: `pieces_tokens.ChunkTables` [B, H, T] (counts [B, T]) of the call.
      scale: a static float multiplying the pair weights and q_side: the output's state term forward (o, dQ),
      the state's update in reverse (dK, dV), as walk's scale and scale_update do.
      dots_with: None, or w [B, T, Hw, Dz] bf16 (Hw dividing H, read at head h // (H / Hw)): then each row's
      out_t . w_t comes back too, in float32 before the output's rounding, its state part from the rows the other
      walk rounds (q . dq from the dQ walk, k . dk from the dK walk: the decay gradient's terms; the module
      docstring). These walks also take the state as two bf16 operands.
    Returns:
      out [B, T, H, Dz] bf16, and with dots_with the dots [B, H, T] float32.
    """
    pieces = _check(x, y, z, states_in, piece_len, config)
    _check_tables(tables, states_in.shape[:2], x.shape[1])
    if dots_with is not None:
        _check(x, y, dots_with, states_in, piece_len, config)
    out = _launch(tuple(tables), x, y, z, states_in, piece_len, pieces, reverse=reverse, scale=scale,
                  scale_update=False, config=config, interpret=interpret, tokens=True, dots_with=dots_with)
    if dots_with is None:
        return out
    out, shares = out
    return out, jnp.sum(shares, axis=2)


def _pairs(x, y, z, h: int, dots_with, config: Config) -> bool:
    """Whether one CTA walks output heads 2i and 2i + 1 (config.pair_heads): they read one head of X and one of Y
    (whose counts divide H / 2), Z has its own head of 64 columns per output head, and no dots are asked.

    Why: Mamba-2's output and dV walks (X, Y: the group's C and B; Z: a head's 64 columns of V or dO) otherwise
    give each warpgroup 32 of a head's columns, so every wgmma but the scores' has N = 32, and both warpgroups
    of every head compute the same chunk scores. Paired, the pair's Z columns are adjacent in memory (a [C, 128]
    slab, loaded as Dz = 128 is) and warpgroup w owns head 2i + w whole: the same shared memory and wgmma shapes
    as the Dz = 128 walk, each with its own head's decay, and half the CTAs."""
    return (config.pair_heads and dots_with is None and z.shape[-1] == 64 and h % 2 == 0 and z.shape[2] == h
            and all((h // 2) % a.shape[2] == 0 for a in (x, y)))


def _bytes(refs) -> int:
    """The shared memory a (nested) tuple of plgpu.SMEM refs takes, in bytes."""
    return sum(math.prod(r.shape) * jnp.dtype(r.dtype).itemsize for r in jax.tree.leaves(refs))


def _ring(config: Config, piece_len: int, *, dx: int, dz: int, dtype, tokens: bool, pair: int, dots: bool):
    """(stages, stage_w, the shared-memory refs) of a walk: the deepest ring of X, Y and Z chunk stages up to
    config.stages that fits a Hopper CTA, and whether w's rows (the dots walks') get a ring of their own.

    The dots walks' residual operand (Dx Dz bf16: 16 KB at Dx = 64, Dz = 128; 32 KB at 128, 128) leaves room for 2
    stages at Dx = Dz = 128. Their w rows come through a ring of their own where it costs no stage (Mamba-2's
    Dx = 64, Dz = 128: 3 stages with it, 213 KB), else straight from HBM into registers (Dx = Dz = 128: the ring
    would leave 1 stage). On an H200 at a Mamba-2 1.3B layer, taking w's rows from shared memory instead of HBM made
    its SSD forward+backward 6.470 -> 5.876 ms (benchmarks/results/KERNEL_NOTES.md, session 19).
    """
    c = config.chunk
    half = dz // _COMPUTE_WGS
    # One tiling and swizzle for every shared-memory operand, that of a warpgroup's half of Z's columns (the
    # wgmma operands of one product agree on it; at Dx = Dz = 128 it is also that of the full rows and of the
    # scores; rows wider than it, X's and Y's at Dx > Dz / 2, hold several tiles).
    mma = _mma_transforms(half, dtype)

    def shared_memory(stages, stage_w):
        smem = (
            plgpu.SMEM((stages, c, dx), dtype, transforms=mma),
            plgpu.SMEM((stages, c, dx), dtype, transforms=mma),
            plgpu.SMEM((stages, c, dz), dtype, transforms=mma),
            plgpu.SMEM((_COMPUTE_WGS, dx, half), dtype, transforms=mma),
            plgpu.SMEM((_COMPUTE_WGS, c, c), dtype, transforms=mma),
            plgpu.SMEM((_COMPUTE_WGS, c, half), dtype, transforms=mma),
        )
        if tokens:  # each chunk's tables, staged with its X, Y, Z: cum, cum, counts, counts, q_side, k_side
            per_head, shared = plgpu.SMEM((stages, pair, c), _F32), plgpu.SMEM((stages, c), jnp.int32)
            smem += ((per_head, per_head, shared, shared, per_head, per_head),)
        else:  # the output's staging
            smem += (plgpu.SMEM((_COMPUTE_WGS, c, half), dtype, transforms=mma),)
        if dots:  # the state's residual operand; each row's out . w, per warpgroup
            smem += (plgpu.SMEM((_COMPUTE_WGS, dx, half), dtype, transforms=mma),
                     plgpu.SMEM((_COMPUTE_WGS, c), _F32))
        if stage_w:  # w's chunks, beside Z's
            smem += (plgpu.SMEM((stages, c, dz), dtype, transforms=mma),)
        return smem

    def deepest(stage_w):
        stages = max(1, min(config.stages, piece_len // c))
        while stages > 1 and _bytes(shared_memory(stages, stage_w)) > _SMEM_BYTES:
            stages -= 1
        return stages

    stages = deepest(False)
    stage_w = dots and deepest(True) == stages
    return stages, stage_w, shared_memory(stages, stage_w)


def _launch(decay_inputs, x, y, z, states_in, piece_len, pieces, *, reverse, scale, scale_update, config,
            interpret, tokens, dots_with=None):
    """Runs `_kernel` over the (batch, head, piece) grid, a grid head per output head or per pair of them
    (`_pairs`); decay_inputs: (rates,), or the ChunkTables; dots_with (tokens only): None, or w [B, T, Hw, Dz]
    whose rows' dots with the float32 output rows come back too."""
    b, t, _, dx = x.shape
    h_out, dz_out = states_in.shape[1], z.shape[-1]
    pair = 2 if _pairs(x, y, z, h_out, dots_with, config) else 1
    # The decay inputs' heads on a pair axis; paired, Z holds a pair's columns side by side (states_in as is).
    if tokens:
        decay_inputs = tuple(a.reshape(b, h_out // pair, pair, t) if a.ndim == 3 else a for a in decay_inputs)
    else:
        decay_inputs = (decay_inputs[0].reshape(h_out // pair, pair),)
    if pair == 2:
        z = z.reshape(b, t, h_out // 2, 2 * dz_out)
    dz = z.shape[-1]
    h = h_out // pair
    c = config.chunk
    dt = x.dtype
    stages, stage_w, smem = _ring(config, piece_len, dx=dx, dz=dz, dtype=dt, tokens=tokens, pair=pair,
                                  dots=dots_with is not None)
    loaded = (plgpu.Barrier(num_barriers=stages),) * 3
    if tokens:
        loaded += (plgpu.Barrier(num_arrivals=2 + 4 * pair, num_barriers=stages),)
    if stage_w:
        loaded += (plgpu.Barrier(num_barriers=stages),)
    out_type = jax.ShapeDtypeStruct((b, t, h, dz), dt)
    extra_in = ()
    if dots_with is not None:
        out_type = (out_type, jax.ShapeDtypeStruct((b, h, _COMPUTE_WGS, t), _F32))
        extra_in = (dots_with,)
    scratch = (smem, loaded, plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages))
    kernel = plgpu.kernel(
        functools.partial(_kernel, c=c, piece_len=piece_len, stages=stages, reverse=reverse, scale=float(scale),
                          scale_update=scale_update, groups=tuple(h // a.shape[2] for a in (x, y, z, *extra_in)),
                          pair=pair, config=config, interpret=interpret, tokens=tokens, dots=dots_with is not None,
                          stage_w=stage_w),
        out_type=out_type,
        scratch_types=scratch,
        grid=(b, h, pieces),
        grid_names=("b", "h", "p"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        # Which walk, for profiles (every Mosaic kernel is otherwise "anonymous_mosaic_gpu_kernel").
        kernel_name="walk" + "".join(part for part, on in (("_tokens", tokens), ("_reverse", reverse),
                                                          ("_dots", dots_with is not None), ("_pair", pair == 2))
                                     if on),
        compiler_params=plgpu.CompilerParams(approx_math=config.approx_math),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    out = kernel(*decay_inputs, x, y, z, states_in.astype(_F32), *extra_in)
    if pair == 2:
        out = out.reshape(b, t, h_out, dz_out)
    # plgpu.kernel drops the manual mesh axes its inputs vary over (inside lasp_attention's shard_map); the
    # outputs vary over x's, as check_vma needs.
    return jax.tree.map(lambda a: kernel_support.vary_like(a, x), out)


def supported(q, k, v, interpret: bool = False) -> str | None:
    """None when the walks can run attention over these q, k, v here (compiled: a Hopper GPU), else the reason.
    Which Hopper parts their GPU tests qualified is `impls.qualification`'s."""
    if q.shape[-1] not in HEAD_DIMS or v.shape[-1] not in HEAD_DIMS:
        return f"head dims Dk={q.shape[-1]}, Dv={v.shape[-1]}: the walks take head dims in {HEAD_DIMS}"
    if {jnp.dtype(x.dtype) for x in (q, k, v)} != {jnp.dtype(jnp.bfloat16)}:
        return f"q, k, v must be bfloat16 (wgmma operands); got {q.dtype}, {k.dtype}, {v.dtype}"
    if interpret:
        return None
    return kernel_support.hopper_unavailable("wgmma", "impl 'pallas_mosaic_interpret' runs on CPU")


@dataclasses.dataclass(frozen=True)
class Walks(pieces.Driven, pieces_tokens.DrivenTokens):
    """impl "pallas_mosaic" as a `vjp.TokenImpl`, a `pieces.Backend` and a `pieces_tokens.TokenBackend`:
    `pallas_triton`'s plan and state passes under `triton` (their chunk must equal config.chunk), the four walks
    under config. interpret: Mosaic GPU's interpreter for the walks, Pallas interpret mode for the state passes
    and the drivers' piece scans.

    The walks launch one CTA per (batch, head or pair of heads, piece) of the Triton plan, whose pieces count the
    Triton head-dim tiles: half of target_programs at d=128, e.g. 128 CTAs at B=1, H=16 (not tuned for the
    walks)."""

    config: Config = DEFAULT
    triton: pallas_triton.Config = pallas_triton.DEFAULT
    interpret: bool = False

    def __post_init__(self):
        if self.config.chunk != self.triton.chunk:
            raise ValueError(f"config.chunk={self.config.chunk} must equal triton.chunk={self.triton.chunk} (one "
                             "chunking for the state passes and the walks)")

    def plan(self, q, v) -> pieces.Plan:
        return pallas_triton.plan(q, v, self.triton)

    def state_sums(self, x, y, rates, plan, *, reverse, scale):
        return pallas_triton.state_sums(x, y, rates, plan, self.triton, reverse=reverse, scale=scale,
                                        interpret=self.interpret)

    def _walk(self, x, y, z, rates, states_in, plan, **how):
        return walk(x, y, z, rates, states_in, plan.piece_len, config=self.config, interpret=self.interpret, **how)

    def output(self, q, k, v, rates, pieces_in, plan, scale):
        return self._walk(q, k, v, rates, pieces_in, plan, reverse=False, scale=scale)

    def grads(self, q, k, v, do, rates, pieces_in, pieces_out, plan, scale):
        """Each backward product is the output walk with other roles: dQ walks forward with S^T over (dO, V,
        K); dV and dK walk backward with dS over (K, Q, dO) and dS^T over (V, dO, Q), scale on the dS update."""
        dq = self._walk(do, v, k, rates, _transposed(pieces_in), plan, reverse=False, scale=scale)
        dv = self._walk(k, q, do, rates, pieces_out, plan, reverse=True, scale=scale, scale_update=True)
        dk = self._walk(v, do, q, rates, _transposed(pieces_out), plan, reverse=True, scale=scale, scale_update=True)
        return dq, dk, dv

    def supported(self, q, k, v):
        return supported(q, k, v, self.interpret) or pallas_triton.supported(q, k, v, self.interpret)

    def state_sums_tokens(self, x, y, w, plan):
        return pallas_triton.Kernels(self.triton, self.interpret).state_sums_tokens(x, y, w, plan)

    def _token_walk(self, x, y, z, tables, states_in, plan, **how):
        return token_walk(x, y, z, tables, states_in, plan.piece_len, config=self.config, interpret=self.interpret,
                          **how)

    def output_tokens(self, q, k, v, tables, pieces_in, plan, scale):
        return self._token_walk(q, k, v, tables, pieces_in, plan, reverse=False, scale=scale)

    def grads_tokens(self, q, k, v, do, tables, pieces_in, pieces_out, plan, scale):
        """The roles of `grads` with the token walks; the dQ and dK walks also return each row's q . dq and
        k . dk (`token_walk`'s dots_with), whose difference is the decay gradient's x. Each gradient is per output
        head: bf16 shares where its input has fewer heads than H (the driver sums them in float32)."""
        dq, q_dq = self._token_walk(do, v, k, tables, _transposed(pieces_in), plan, reverse=False, scale=scale,
                                    dots_with=q)
        dv = self._token_walk(k, q, do, tables, pieces_out, plan, reverse=True, scale=scale)
        dk, k_dk = self._token_walk(v, do, q, tables, _transposed(pieces_out), plan, reverse=True, scale=scale,
                                    dots_with=k)
        return dq, dk, dv, k_dk - q_dq

    def supported_tokens(self, q, k, v):
        return self.supported(q, k, v)


def _transposed(x):
    return jnp.swapaxes(x, -1, -2)


WALKS = Walks()
INTERPRET = Walks(interpret=True)
