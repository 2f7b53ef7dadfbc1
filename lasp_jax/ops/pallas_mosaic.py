"""The forward output pass as a Mosaic GPU (Hopper) Pallas kernel: an experiment against the Triton one.

Why: `pallas_triton`'s output pass (`_output_kernel`) tiles Dv by 64 because whole 128 x 128 fp32 states were
slower in the Triton lowering, and each Dv tile then re-reads Q and K (6 tensor-equivalents of HBM traffic for
a pass whose floor is 4; benchmarks/results/KERNEL_NOTES.md). Here one CTA per (batch, head, piece) holds the
WHOLE state, split by columns over two compute warpgroups (each owns S[:, Dv/2 columns] as a wgmma accumulator
in registers), while a third warpgroup streams the chunks of Q, K and V into a ring of shared-memory stages
with TMA. Q and K are read from HBM once per CTA.

Per chunk of C rows (warpgroup w owns columns cols_w of V, S and O; all matmuls are wgmma):

    scores = Q K^T                                   [C, C]     (both warpgroups; it is cheap)
    O_w    = lambda^i (Q S_w) + ((scores * M) V_w)    [C, Dv/2]  M[i, j] = lambda^(i - j) (i >= j), else 0
    S_w    = lambda^C S_w + K^T (lambda^(C - j) V_w)  [Dk, Dv/2] (A = K^T: a transposed shared-memory operand)

and S_w's bf16 copy, the B operand of the next chunk's Q S_w, is written to shared memory. Each chunk issues
two pairs of wgmma: (Q K^T, Q S_w), during which V_w is decayed into shared memory, then (intra V_w, the
state update), both accumulating from their initial values (pl.run_state). The decayed scores reach their
wgmma through shared memory, or as a register operand with Config.scores_in_registers (GPU only).

Numerics: bf16 operands, float32 accumulation and state, as in `pallas_triton`: the state is rounded to bf16
only as a matmul operand, the decayed scores once. One difference: the state update's decay lambda^(C - j) is
applied to V's rows (each warpgroup scales its own columns) where the Triton kernel scales K's rows, so the
bf16 rounding of that operand falls on lambda^(C - j) v_j instead of lambda^(C - j) k_j (the same product
in exact arithmetic). Powers of lambda are exp(-s * n) with n >= 0.

Scope (a prototype): bf16, Dk = Dv = 128, Hkv == H (no GQA), T a whole number of pieces and pieces a whole
number of chunks (what `pallas_triton.forward` hands its output pass after padding); Hopper only (wgmma,
TMA). `Config.interpret` runs the kernel in Mosaic GPU's CPU interpreter (tests).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_F32 = jnp.float32
_HOPPER = ("H100", "H200")
_COMPUTE_WGS = 2  # compute warpgroups; each owns Dv / 2 columns of the state
_HEAD_DIM = 128  # Dk = Dv: what the kernel is written and tested for


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes and launch parameters.

    chunk: rows per chunk (the wgmma M of the intra-chunk products; a multiple of 64). stages: shared-memory
    ring depth of the Q, K, V chunk loads (each stage holds 3 x chunk x 128 bf16 = 48 KB at C = 64; Hopper
    offers 227 KB per CTA, of which the bf16 state copies (32 KB), the decayed scores and the decayed V
    columns (16 KB each) and the output staging (16 KB) take 80 KB: 3 stages fit, 4 do not). compute_registers,
    memory_registers: per-thread register budgets of the compute and the TMA warpgroups (setmaxnreg).
    approx_math: fast approximate exp. scores_in_registers: the decayed scores enter their wgmma as a register
    A operand (as FlashAttention 3 does with its probabilities) instead of through shared memory; GPU only (the
    interpreter's wgmma takes shared-memory operands), so only the GPU test and the CUDA lowering check it.
    interpret: run in Mosaic GPU's CPU interpreter (tests; slow).
    """

    def __post_init__(self):
        if self.interpret and self.scores_in_registers:
            raise ValueError("scores_in_registers needs a GPU: the interpreter's wgmma takes shared-memory operands")

    chunk: int = 64
    stages: int = 3
    compute_registers: int = 232
    memory_registers: int = 40
    approx_math: bool = False
    scores_in_registers: bool = False
    interpret: bool = False


DEFAULT = Config()
INTERPRET = dataclasses.replace(DEFAULT, interpret=True)


def _mma_transforms(cols: int, dtype) -> tuple:
    """Tiling and swizzle that wgmma accepts for a bf16 operand whose rows are `cols` wide."""
    swizzle = plgpu.find_swizzle(cols * jnp.dtype(dtype).itemsize * 8)
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _accumulate(inits, issue, config: Config):
    """inits + what issue(accs) adds to wgmma accumulators accs (one per init), as arrays.

    On a GPU the accumulators start from inits (pl.run_state, which also awaits the wgmmas). Mosaic GPU's
    interpreter (jax 0.11.2) interprets neither pl.run_state nor stores into an accumulator, so there the
    accumulators start from zero and inits are added after: the same sums, one rounding apart in float32.
    """
    if not config.interpret:
        return pl.run_state(issue)(tuple(plgpu.ACC.init(x) for x in inits))

    def from_zero(*accs):
        issue(accs)
        return tuple(acc[...] for acc in accs)

    sums = pl.run_scoped(from_zero, *(plgpu.ACC(x.shape, x.dtype) for x in inits))
    return tuple(x + y for x, y in zip(inits, sums))


def _kernel(s_ref, q_ref, k_ref, v_ref, pieces_ref, o_ref, smem, loaded, consumed, *, c, piece_len, stages,
            config):
    """One CTA: (batch, head, piece) of the grid; warpgroups 0 and 1 compute, warpgroup 2 loads."""
    q_smem, k_smem, v_smem, s_smem, scores_smem, vw_smem, o_smem = smem
    q_bar, k_bar, v_bar = loaded
    b, h, p = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("p")
    wg = lax.axis_index("wg")
    n_chunks = piece_len // c
    start = p * piece_len
    half = v_ref.shape[-1] // _COMPUTE_WGS

    def rows(n):
        return pl.ds(start + n * c, c)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(config.compute_registers, action="increase")
        cols = pl.ds(wg * half, half)
        rate = s_ref[h]
        # Decay tables, computed once: powers exp(-s n) with n >= 0 only.
        idx = plgpu.broadcasted_iota(jnp.int32, (c, c), 0, layout=plgpu.Layout.WGMMA)
        jdx = plgpu.broadcasted_iota(jnp.int32, (c, c), 1, layout=plgpu.Layout.WGMMA)
        gap = (idx - jdx).astype(_F32)
        mask = jnp.where(idx >= jdx, jnp.exp(-rate * jnp.maximum(gap, 0.0)), 0.0)
        i = plgpu.broadcasted_iota(jnp.int32, (c,), 0, layout=plgpu.Layout.WGMMA.reduce(1)).astype(_F32)
        q_decay = lax.broadcast_in_dim(jnp.exp(-rate * i), (c, half), [0])
        k_decay = lax.broadcast_in_dim(jnp.exp(-rate * (c - i)), (c, half), [0])
        chunk_decay = jnp.exp(-rate * c)

        # Straight from HBM into registers, once per CTA (unoptimized: Mosaic GPU's fast path is for SMEM).
        state = plgpu.load(pieces_ref.at[b, h, p, :, cols], layout=plgpu.Layout.WGMMA, optimized=False)
        s_smem[wg] = state.astype(s_smem.dtype)
        plgpu.commit_smem()

        def body(n, state):
            slot = lax.rem(n, stages)
            plgpu.barrier_wait(q_bar.at[slot])
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[slot])
            q, k, v = q_smem.at[slot], k_smem.at[slot], v_smem.at[slot]

            def scores_and_inter(scores_acc, inter_acc):
                plgpu.wgmma(scores_acc, q, k.transpose((1, 0)))
                plgpu.wgmma(inter_acc, q, s_smem.at[wg])
                # While the tensor cores work: the state update's B operand, this warpgroup's columns of V
                # with rows scaled by lambda^(C - j).
                vw_smem[wg] = (v.at[:, cols][...].astype(_F32) * k_decay).astype(vw_smem.dtype)
                return scores_acc[...], inter_acc[...]

            scores, inter = pl.run_scoped(scores_and_inter, plgpu.ACC((c, c), _F32), plgpu.ACC((c, half), _F32))
            # The decayed scores reach their wgmma through shared memory (the interpreter's wgmma takes
            # shared-memory operands only, so the tests run this path), or as a register A operand.
            decayed = (scores * mask).astype(scores_smem.dtype)
            if not config.scores_in_registers:
                scores_smem[wg] = decayed
                plgpu.commit_smem()
                decayed = scores_smem.at[wg]

            def intra_and_update(accs):
                o_acc, state_acc = accs
                plgpu.wgmma(o_acc, decayed, v.at[:, cols])
                plgpu.wgmma(state_acc, k.transpose((1, 0)), vw_smem.at[wg])

            o, state = _accumulate((q_decay * inter, chunk_decay * state), intra_and_update, config)
            plgpu.barrier_arrive(consumed.at[slot])
            s_smem[wg] = state.astype(s_smem.dtype)

            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous chunk's O has left o_smem
            o_smem[wg] = o.astype(o_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[b, rows(n), h, cols])
            return state

        lax.fori_loop(0, n_chunks, body, state)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _memory():
        plgpu.set_max_registers(config.memory_registers, action="decrease")

        def load(n, slot):
            plgpu.copy_gmem_to_smem(q_ref.at[b, rows(n), h], q_smem.at[slot], q_bar.at[slot])
            plgpu.copy_gmem_to_smem(k_ref.at[b, rows(n), h], k_smem.at[slot], k_bar.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[b, rows(n), h], v_smem.at[slot], v_bar.at[slot])

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


def output_pass(q, k, v, s, pieces_in, piece_len: int, config: Config = DEFAULT):
    """The forward output pass of `pallas_triton.forward`, as one Mosaic GPU kernel.

    Args:
      q, k [B, T, H, Dk], v [B, T, H, Dv] bf16 (Dk = Dv = 128); s [H] float32 decay rates; pieces_in
      [B, H, P, Dk, Dv] float32, the state entering each piece of piece_len positions (T = P * piece_len,
      piece_len a multiple of config.chunk).
    Returns:
      o [B, T, H, Dv] bf16: per piece, chunkwise [(Q K^T) * M] V + lambda^i Q S with S walking from pieces_in.
    """
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    c = config.chunk
    if k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape}: need k like q and v [B, T, H, Dv] (no GQA)")
    if (dk, dv) != (_HEAD_DIM, _HEAD_DIM):
        raise ValueError(f"head dims Dk={dk}, Dv={dv}: this kernel takes Dk = Dv = {_HEAD_DIM}")
    if {jnp.dtype(x.dtype) for x in (q, k, v)} != {jnp.dtype(jnp.bfloat16)}:
        raise ValueError(f"q, k, v must be bfloat16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if c % 64 or piece_len % c or t % piece_len:
        raise ValueError(f"T={t}, piece_len={piece_len}, chunk={c}: need chunk % 64 == 0, piece_len % chunk == 0 "
                         "and T % piece_len == 0")
    pieces = t // piece_len
    if pieces_in.shape != (b, h, pieces, dk, dv):
        raise ValueError(f"pieces_in {pieces_in.shape}: expected {(b, h, pieces, dk, dv)}")
    stages = max(1, min(config.stages, piece_len // c))
    half = dv // _COMPUTE_WGS
    dt = q.dtype
    scratch = (
        (
            plgpu.SMEM((stages, c, dk), dt, transforms=_mma_transforms(dk, dt)),
            plgpu.SMEM((stages, c, dk), dt, transforms=_mma_transforms(dk, dt)),
            plgpu.SMEM((stages, c, dv), dt, transforms=_mma_transforms(dv, dt)),
            plgpu.SMEM((_COMPUTE_WGS, dk, half), dt, transforms=_mma_transforms(half, dt)),
            plgpu.SMEM((_COMPUTE_WGS, c, c), dt, transforms=_mma_transforms(c, dt)),  # unused with scores_in_registers
            plgpu.SMEM((_COMPUTE_WGS, c, half), dt, transforms=_mma_transforms(half, dt)),
            plgpu.SMEM((_COMPUTE_WGS, c, half), dt, transforms=_mma_transforms(half, dt)),
        ),
        (plgpu.Barrier(num_barriers=stages),) * 3,
        plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
    )
    kernel = plgpu.kernel(
        functools.partial(_kernel, c=c, piece_len=piece_len, stages=stages, config=config),
        out_type=jax.ShapeDtypeStruct((b, t, h, dv), dt),
        scratch_types=scratch,
        grid=(b, h, pieces),
        grid_names=("b", "h", "p"),
        num_threads=_COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=config.approx_math),
        interpret=plgpu.InterpretGPUParams() if config.interpret else None,
    )
    return kernel(s.astype(_F32), q, k, v, pieces_in.astype(_F32))


def supported(q, k, v, config: Config = DEFAULT) -> str | None:
    """None when `output_pass` can run these inputs here, else the reason."""
    if k.shape[2] != q.shape[2] or v.shape[2] != q.shape[2]:
        return f"GQA/MQA (H={q.shape[2]}, Hkv={k.shape[2]}) is not implemented in this prototype"
    if (q.shape[-1], v.shape[-1]) != (_HEAD_DIM, _HEAD_DIM):
        return f"head dims Dk={q.shape[-1]}, Dv={v.shape[-1]}: only Dk = Dv = {_HEAD_DIM} is implemented"
    if {jnp.dtype(x.dtype) for x in (q, k, v)} != {jnp.dtype(jnp.bfloat16)}:
        return f"q, k, v must be bfloat16 (wgmma operands); got {q.dtype}, {k.dtype}, {v.dtype}"
    if config.interpret:
        return None
    if jax.default_backend() != "gpu":
        return f"Mosaic GPU needs a CUDA GPU (backend here: {jax.default_backend()}); Config.interpret runs on CPU"
    kind = jax.devices()[0].device_kind
    if not any(name in kind for name in _HOPPER):
        return f"Mosaic GPU wgmma and TMA need a Hopper GPU ({_HOPPER}); this is {kind!r}"
    return None
