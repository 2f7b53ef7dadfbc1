"""The depthwise causal convolution of one piece (Mamba-2's, before the SSD) as Mosaic GPU (Hopper) kernels,
forward and backward, with the contract of `lasp_jax.ops.causal_conv_kernel.convolve` (its docstring has the
formula, xe's halo rows and the document rule; `xla_convolve` there is the reference):

    s[b, t, c] = bias[c] + sum_{i < W} keep_i(b, t) w[i, c] xe[b, t + i, c]        y = act(s)  (None or SiLU)

Why: XLA's autodiff of `xla_convolve` costs about 3.2 ms per Mamba-2 1.3B layer on an H200 (64K tokens, C =
4352) against a floor of about 0.4 ms (read dy and xe, write dxe), and the Pallas Triton kernels lost to XLA
because each output row does 2W - 1 unaligned shifted HBM loads. Here every input row is read from HBM once, by
TMA, and the shifted taps come from registers.

Kernels. One CTA per (block of block_c channels, batch row, run of rows), two warpgroups: one streams tiles of
block_t rows [block_t, block_c] (and the tile's keep bits, with documents) through a ring of shared-memory
stages with TMA; the other walks the tile row by row, each thread owning block_c / 128 adjacent channels
(WG_STRIDED rows), keeping the last W - 1 rows of xe (and, backward, of ds and of the keep bits) in registers,
so each input row is loaded from shared memory once. Outputs leave through double-buffered shared-memory tiles
by TMA. Forward, run of outputs [t0, t0 + run): xe rows t0 .. t0 + W - 2 come straight from HBM, then the tiles
bring xe row t + W - 1 for each output t. Backward, run of steps t in [t0, t0 + run): the tiles bring dy[t] and
xe[t + W - 1]; step t forms ds[t] = dy[t] act'(s[t]) (s recomputed from the window, SiLU only), adds keep_i(t)
ds[t] xe[t + i] to the CTA's dweight[i] column sums and ds[t] to dbias's (float32, in registers for the whole
run: each tile's sums from zero, then added to the run's), and writes

    dxe[t] = sum_i keep_i(t - i) w[i] ds[t - i]        (xe row t; ds[t'] = 0 outside [0, L))

A run after the first recomputes ds at its W - 1 steps before t0 from HBM (a warm-up; the first run's are 0),
and the last run also writes xe's last W - 1 rows of dxe from its window (their ds beyond L are 0). The column
sums leave once per CTA as float32 partials [B, runs, W + 1, C] (dweight rows, then dbias) that XLA sums: no
atomics. With documents, keep bits (bit i of an int32 per output: tap i kept) are formed once in XLA from ide
([B, L], `_keep_bits`) and streamed beside the rows; a dropped tap is selected away, never multiplied by 0, so a
non-finite input in another document does not reach t's output or gradients.

`convolve_zero_halo` runs the same kernels on the piece x [B, L, C] alone with zeros before it (what
lasp_jax.parallel.causal_conv convolves; xe = [zeros; x] is never built): xe row p is x's row p - (W-1), rows
before 0 are zeros selected in, and the backward writes dx [B, L, C] in place of dxe (the first tile skips the
zeros' W-1 rows). This saves the pad's copy of x forward and the slice of dxe backward (each about a read and a
write of x: ~0.25 ms at Mamba-2 1.3B's shape on an H200, where x comes straight from the in-projection).

Numerics: float32 inside (inputs upcast on load); s sums its taps in `xla_convolve`'s order (tap W-1, then W-2
down to 0, the bias last), so the forward matches it to float32 rounding (the compiler may contract into FMAs);
y and dxe in xe's dtype (one rounding each); dweight and dbias float32 sums (per CTA, then over CTAs in XLA),
cast to weight's and bias's dtypes; a CTA's sum adds its tiles' sums of block_t rows (two float32 chains of
32 terms at the defaults, not one of 1024). dxe sums its W terms from i = W-1 down to 0; XLA's autodiff may
add them in another order (float32 rounding). SiLU: s / (1 + exp(-s)); its derivative sig (1 + s (1 - sig)).

Measured: on an H200 at Mamba-2 1.3B's shape (T 64K, C 4352, W 4, bf16, 16 documents, then SiLU in XLA as the
model runs it) 0.672 / 1.311 ms forward / forward+backward against XLA's 0.752 / 3.022; none of five other
Configs was faster (benchmarks/results/conv_gpu_h200_s17.md). Compiled against `xla_convolve` at B 2, L 8192,
C 1024: y 6.6e-6, dxe 1.6e-5 (bf16 ulp flips), dweight and dbias 2.1e-7 (the GPU test). Interpreted: within
1.6e-7 in float32, no race under the interpreter's detector; the CUDA lowering is checked on CPU.

Scope (`supported`): xe bfloat16, float16 or float32; C a multiple of Config.block_c; L a multiple of the run
lengths (each clipped to L), themselves multiples of block_t; 2 <= W <= MAX_WIDTH. Shapes outside are refused,
not padded. Compiled on Hopper (TMA, sm_90); interpret=True runs Mosaic GPU's CPU interpreter (tests). Runs per
device: inside shard_map weight and bias are cast to vary as xe does (kernel_support).
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

from lasp_jax.ops import causal_conv_kernel, kernel_support

_F32 = jnp.float32
_LANES = 128  # threads of a warpgroup: each owns block_c / 128 adjacent channels of every row
ACTIVATIONS = (None, "silu")
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
MAX_WIDTH = 16  # keep bits of an int32 (and unrolled taps)


@dataclasses.dataclass(frozen=True)
class Config:
    """Block sizes (benchmarks/conv_gpu.py times others with --mosaic-configs).

    block_c: channels per CTA, 128 or 256: 128 threads times 1 or 2 adjacent channels (a TMA box spans at most
    256 elements; bf16 256: 512-byte rows, a 4-byte load per thread and row; Mamba-2 1.3B's C = 4352 = 17 *
    256). block_t: rows per TMA tile, a multiple of 4 up to 256 (a TMA box; the keep bits' box is a multiple of
    16 bytes, in ring slots of 128 bytes: `_bits_scratch`). fwd_run, bwd_run: rows per CTA (multiples of block_t,
    clipped to L): at Mamba-2 1.3B's shape (L = 64K) 1024 gives 17 * 64 = 1088 CTAs, about 4 waves of 2 CTAs per
    SM over an H200's 132, and backward partials of 64 x 5 x 4352 float32 (5.6 MB).
    fwd_stages, bwd_stages: TMA ring depth. Shared memory per CTA (bf16, defaults), sized for 2 CTAs per SM
    (each has one computing warpgroup): forward 4 x 32 rows of xe (64 KB) + 2 output tiles (32 KB); backward
    2 x 32 rows of xe and of dy (64 KB) + 2 dxe tiles (32 KB) + the partials (5 KB). On an H200 the defaults beat five
    other Configs (benchmarks/results/conv_gpu_h200_s17.md)."""

    block_c: int = 256
    block_t: int = 32
    fwd_run: int = 1024
    bwd_run: int = 1024
    fwd_stages: int = 4
    bwd_stages: int = 2

    def __post_init__(self):
        if self.block_c not in (128, 256):
            raise ValueError(f"Config.block_c must be 128 or 256 (128 threads x 1 or 2 channels; a TMA box spans at "
                             f"most 256 elements), got {self.block_c}")
        if not 4 <= self.block_t <= 256 or self.block_t % 4:
            raise ValueError(f"Config.block_t must be a multiple of 4 in [4, 256] (a TMA box), got {self.block_t}")
        for name in ("fwd_run", "bwd_run"):
            value = getattr(self, name)
            if value < self.block_t or value % self.block_t:
                raise ValueError(f"Config.{name} must be a positive multiple of block_t={self.block_t}, got {value}")
        for name in ("fwd_stages", "bwd_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"Config.{name} must be >= 1, got {getattr(self, name)}")

    def run(self, length: int, backward: bool) -> int:
        """Rows per CTA at piece length L: the run clipped to L."""
        return min(self.bwd_run if backward else self.fwd_run, length)


DEFAULT = Config()


def supported(xe, interpret: bool | plgpu.InterpretGPUParams = False, width: int = 4,
              config: Config = DEFAULT, halo: bool = True) -> str | None:
    """None when the kernels take xe [B, W-1+L, C] (`convolve`; or with halo=False x [B, L, C],
    `convolve_zero_halo`) of a width-W convolution here (compiled: a Hopper GPU; any platform when interpret),
    else why."""
    reason = _shape_reason(xe, width, config, halo)
    if reason is not None or interpret:
        return reason
    return kernel_support.hopper_unavailable("the convolution's Mosaic kernels (TMA)",
                                             "interpret=True runs Mosaic GPU's CPU interpreter")


def _shape_reason(xe, width: int, config: Config, halo: bool) -> str | None:
    """Why the kernels cannot take xe's (halo) or x's (not halo) dtype and shape at this width and config (None:
    they can)."""
    if jnp.dtype(xe.dtype) not in {jnp.dtype(d) for d in DTYPES}:
        return f"xe's dtype must be one of {[jnp.dtype(d).name for d in DTYPES]}, got {jnp.dtype(xe.dtype).name}"
    if not 2 <= width <= MAX_WIDTH:
        return f"width W={width}: the kernels take 2 <= W <= {MAX_WIDTH}"
    if xe.ndim != 3:
        return f"{'xe must be [B, W-1+L, C]' if halo else 'x must be [B, L, C]'}, got shape {xe.shape}"
    length, c = xe.shape[1] - (width - 1 if halo else 0), xe.shape[2]
    if c % config.block_c:
        return f"C={c} is not a multiple of Config.block_c={config.block_c} (the kernels do not pad)"
    if length < 1:
        return f"L={length}: {xe.shape} holds no position of the piece"
    if not halo and config.block_t < width:  # the first tile holds the W-1 zero rows, then x's first rows
        return (f"Config.block_t={config.block_t} is below the width W={width}: the piece alone (zeros before it) "
                "needs tiles of at least W rows")
    for backward in (False, True):
        run = config.run(length, backward)
        if run % config.block_t or length % run:
            return (f"L={length} must be a multiple of the {'backward' if backward else 'forward'} run ({run} rows, "
                    f"Config.{'bwd' if backward else 'fwd'}_run clipped to L), itself a multiple of Config.block_t="
                    f"{config.block_t} (the kernels do not pad)")
    return None


def _keep_bits(ide, width: int):
    """int32 [B, L]: bit i (i < W-1) of output t set when tap i is kept, i.e. no document starts at xe rows
    (t + i, t + W-1] (ide [B, W-1+L]); tap W-1 (t itself) is always kept and has no bit."""
    length = ide.shape[1] - (width - 1)
    linked = ide[:, 1:] == ide[:, :-1]  # [B, W-2+L]: xe rows q and q+1 in one document
    bits = jnp.zeros((ide.shape[0], length), jnp.int32)
    keep = None
    for i in range(width - 2, -1, -1):
        keep = linked[:, i:i + length] if keep is None else keep & linked[:, i:i + length]
        bits = bits | (keep.astype(jnp.int32) << i)
    return bits


# ---------------------------------------------------------------------------------------------------------
# Kernels.


def _row_layout(block_c: int):
    return plgpu.Layout.WG_STRIDED((block_c,), vec_size=block_c // _LANES)


def _place(config: Config, run: int):
    """This CTA's place in the (c, b, r) grid: its batch row b, run r, channel columns, first row t0 = r run,
    tiles of block_t rows in the run, and the rows' register layout."""
    b, r = lax.axis_index("b"), lax.axis_index("r")
    cols = pl.ds(lax.axis_index("c") * config.block_c, config.block_c)
    return b, r, cols, r * run, run // config.block_t, _row_layout(config.block_c)


def _kept(bits, i: int):
    """Whether tap i is kept under an output's keep bits (a scalar int32)."""
    return ((bits >> i) & 1) != 0


def _select(keep, row):
    """row where the scalar keep holds, else zeros: a select, never a product with 0 (Mosaic GPU's warpgroup
    lowering takes no implicit broadcast, hence the explicit one)."""
    return lax.select(lax.broadcast_in_dim(keep, row.shape, ()), row, jnp.zeros_like(row))


def _pre_activation(xs, weights, bias, bits):
    """s = bias + sum_i keep_i w_i xs[i] in `xla_convolve`'s order; xs[i], weights[i], bias float32 rows
    [block_c] (xs[i]: xe row t + i), bits None (every tap kept) or the output's keep bits."""
    w = len(xs)
    acc = xs[w - 1] * weights[w - 1]
    for i in range(w - 2, -1, -1):
        term = xs[i] * weights[i]
        if bits is not None:
            term = _select(_kept(bits, i), term)
        acc = acc + term
    return acc + bias


def _sigmoid(s):
    return 1.0 / (1.0 + jnp.exp(-s))


def _activate(s, activation):
    return s * _sigmoid(s) if activation == "silu" else s


def _silu_grad(s):
    sig = _sigmoid(s)
    return sig * (1.0 + s * (1.0 - sig))


def _params(w_ref, b_ref, cols, layout):
    """([W] float32 weight rows, float32 bias row) of the CTA's channels, from HBM."""
    load = lambda ref: plgpu.load(ref, layout=layout, optimized=False).astype(_F32)
    return [load(w_ref.at[i, cols]) for i in range(w_ref.shape[0])], load(b_ref.at[cols])


def _xe_row_loader(xe_ref, b, cols, layout, off: int):
    """load(p): xe row p as float32 [block_c], from the array row p - off of xe_ref (off 0: the array is xe;
    W-1: it is the piece alone, zeros before it, selected in)."""
    def load(p):
        if not off:
            return plgpu.load(xe_ref.at[b, p, cols], layout=layout, optimized=False).astype(_F32)
        row = plgpu.load(xe_ref.at[b, jnp.maximum(p - off, 0), cols], layout=layout, optimized=False)
        return _select(p >= off, row.astype(_F32))
    return load


def _stream(tiles: int, stages: int, issue, consumed):
    """The memory warpgroup's ring: issue(n, slot) for each tile n once its slot's previous tile is consumed;
    then awaits the last releases too (the interpreter checks every barrier phase is awaited)."""
    for slot in range(min(stages, tiles)):
        issue(slot, slot)

    @pl.loop(stages, tiles)
    def _(n):
        slot = lax.rem(n, stages)
        plgpu.barrier_wait(consumed.at[slot])
        issue(n, slot)

    @pl.loop(max(0, tiles - stages), tiles)
    def _(n):
        plgpu.barrier_wait(consumed.at[lax.rem(n, stages)])


def _unrolled_rows(block_t: int) -> int:
    """Rows a tile's loop step unrolls: 8 (or 4, the tile a multiple of 4 only). Mosaic GPU's layout inference
    grows faster than the ops it types: with the default's 32 rows unrolled whole, lowering the forward and
    backward took 12.7 s of an H200 host's time, 8 rows a step 2.2 s, at the same kernel time (1.315 against
    1.313 ms forward+backward at Mamba-2 1.3B's shape; benchmarks/results/conv_gpu_h200_s25.md)."""
    return math.gcd(block_t, 8)


def _forward_kernel(*refs, activation, docs, config: Config, run: int, off: int):
    """One CTA: (channel block, batch row, run of `run` outputs); warpgroup 0 computes, 1 loads. off: xe row p
    is the input's row p - off (0: the input is xe; W-1: the piece alone, zeros before it)."""
    xe_ref, w_ref, b_ref, *rest = refs
    bits_ref = rest.pop(0) if docs else None
    y_ref, x_smem, bits_smem, y_smem, loaded, consumed = rest
    bt, stages = config.block_t, config.fwd_stages
    unroll = _unrolled_rows(bt)
    w = w_ref.shape[0]
    b, r, cols, t0, tiles, layout = _place(config, run)

    @pl.when(lax.axis_index("wg") == 0)
    def _compute():
        weights, bias = _params(w_ref, b_ref, cols, layout)
        load = lambda ref: plgpu.load(ref, layout=layout, optimized=False).astype(_F32)
        xe_row = _xe_row_loader(xe_ref, b, cols, layout, off)
        window = tuple(xe_row(t0 + j) for j in range(w - 1))  # xe rows t0 .. t0+W-2

        def tile(n, window):
            slot, out = lax.rem(n, stages), lax.rem(n, 2)
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the tile before last has left y_smem[out]
            plgpu.barrier_wait(loaded.at[slot])
            plgpu.commit_smem()  # a warpgroup barrier: no thread writes y_smem[out] before that wait

            def rows(k, window):  # the tile's rows k * unroll ..., unrolled
                for j in (k * unroll + u for u in range(unroll)):
                    xs = window + (load(x_smem.at[slot, j]),)  # xs[i]: xe row t + i
                    bits = bits_smem[slot, j] if docs else None
                    y = _activate(_pre_activation(xs, weights, bias, bits), activation)
                    y_smem[out, j] = y.astype(y_smem.dtype)
                    window = xs[1:]
                return window

            window = lax.fori_loop(0, bt // unroll, rows, window)
            plgpu.commit_smem()  # the rows visible to TMA, and every thread done reading the slot
            plgpu.barrier_arrive(consumed.at[slot])
            plgpu.copy_smem_to_gmem(y_smem.at[out], y_ref.at[b, pl.ds(t0 + n * bt, bt), cols])
            return window

        # A carry computed, not loaded: under shard_map loaded values carry manual axes (pallas_mosaic's note).
        lax.fori_loop(0, tiles, tile, tuple(x * 1.0 for x in window))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(lax.axis_index("wg") == 1)
    def _memory():
        def issue(n, slot):
            start = t0 + n * bt
            plgpu.copy_gmem_to_smem(xe_ref.at[b, pl.ds(start + w - 1 - off, bt), cols], x_smem.at[slot],
                                    loaded.at[slot])
            if docs:
                plgpu.copy_gmem_to_smem(bits_ref.at[b, pl.ds(start, bt)], bits_smem.at[slot, pl.ds(0, bt)],
                                        loaded.at[slot])

        _stream(tiles, stages, issue, consumed)


def _backward_kernel(*refs, activation, docs, config: Config, run: int, runs: int, off: int):
    """One CTA: (channel block, batch row, run of `run` steps t); warpgroup 0 computes, 1 loads. Writes dxe
    rows [t0, t0 + run) (the last run also xe's last W-1 rows) and the run's partials [W + 1, block_c]. off:
    xe row p is the input's (and dxe's output's) row p - off (`_forward_kernel`); with off = W-1 the rows
    p < W-1 (the zeros before the piece) are neither read nor written."""
    xe_ref, w_ref, b_ref, *rest = refs
    bits_ref = rest.pop(0) if docs else None
    dy_ref, dxe_ref, part_ref, x_smem, dy_smem, bits_smem, dx_smem, part_smem, loaded, consumed = rest
    bt, stages = config.block_t, config.bwd_stages
    unroll = _unrolled_rows(bt)
    w = w_ref.shape[0]
    length = dy_ref.shape[1]
    b, r, cols, t0, tiles, layout = _place(config, run)

    @pl.when(lax.axis_index("wg") == 0)
    def _compute():
        weights, bias = _params(w_ref, b_ref, cols, layout)
        load = lambda ref: plgpu.load(ref, layout=layout, optimized=False).astype(_F32)

        def ds_of(g, xs, bits):
            """ds[t] from dy[t] (float32) and, for SiLU, s[t] recomputed from xs (xe rows t .. t+W-1)."""
            if activation is None:
                return g
            return g * _silu_grad(_pre_activation(xs, weights, bias, bits))

        def dxe_row(ds_window, bits_window):
            """dxe[t] = sum_i keep_i(t - i) w[i] ds[t - i], i from W-1 down; ds_window[i] = ds[t - i]."""
            acc = None
            for i in range(w - 1, -1, -1):
                term = ds_window[i] * weights[i]
                if docs and i < w - 1:
                    term = _select(_kept(bits_window[i], i), term)
                acc = term if acc is None else acc + term
            return acc

        # The W-1 steps before t0 (none before the first run: ds 0 there). Loads clamp to row 0 and the first
        # run selects their ds away.
        xe_row = _xe_row_loader(xe_ref, b, cols, layout, off)
        xe_rows = {j: xe_row(jnp.maximum(t0 + j, 0)) for j in range(-(w - 1), w - 1)}
        ds_prev, bits_prev = [], []  # index j - 1: step t0 - j
        for j in range(1, w):
            t = jnp.maximum(t0 - j, 0)
            bits = bits_ref[b, t] if docs else None
            g = load(dy_ref.at[b, t, cols])
            ds = ds_of(g, [xe_rows[i - j] for i in range(w)], bits)
            ds_prev.append(_select(r > 0, ds))
            bits_prev.append(bits)
        window = tuple(xe_rows[j] for j in range(w - 1))  # xe rows t0 .. t0+W-2
        zero = bias * 0.0
        carry = (window, tuple(ds_prev), tuple(bits_prev) if docs else (), (zero,) * w, zero)

        def tile(n, carry):
            window, ds_prev, bits_prev, dw, db = carry
            slot, out = lax.rem(n, stages), lax.rem(n, 2)
            plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # the tile before last has left dx_smem[out]
            plgpu.barrier_wait(loaded.at[slot])
            plgpu.commit_smem()  # a warpgroup barrier: no thread writes dx_smem[out] before that wait

            def rows(k, carry):  # the tile's rows k * unroll ..., unrolled
                window, ds_prev, bits_prev, tile_dw, tile_db = carry
                for j in (k * unroll + u for u in range(unroll)):
                    xs = window + (load(x_smem.at[slot, j]),)  # xs[i]: xe row t + i
                    bits = bits_smem[slot, j] if docs else None
                    ds = ds_of(load(dy_smem.at[slot, j]), xs, bits)
                    terms = [ds * xs[i] for i in range(w)]
                    if docs:
                        terms = [terms[i] if i == w - 1 else _select(_kept(bits, i), terms[i]) for i in range(w)]
                    tile_dw, tile_db = tuple(acc + term for acc, term in zip(tile_dw, terms)), tile_db + ds
                    ds_win, bits_win = (ds,) + ds_prev, ((bits,) + bits_prev) if docs else ()  # [i]: step t - i
                    dx_smem[out, j] = dxe_row(ds_win, bits_win).astype(dx_smem.dtype)
                    ds_prev, bits_prev = ds_win[:w - 1], bits_win[:w - 1]
                    window = xs[1:]
                return window, ds_prev, bits_prev, tile_dw, tile_db

            # The tile's own sums from zero, then added to the run's (two shorter float32 chains).
            window, ds_prev, bits_prev, tile_dw, tile_db = lax.fori_loop(
                0, bt // unroll, rows, (window, ds_prev, bits_prev, (zero,) * w, zero))
            plgpu.commit_smem()  # the rows visible to TMA, and every thread done reading the slot
            plgpu.barrier_arrive(consumed.at[slot])
            if off:  # the first tile's first W-1 rows are the zeros' gradients: not written
                first = (r == 0) & (n == 0)

                @pl.when(first)
                def _():
                    plgpu.copy_smem_to_gmem(dx_smem.at[out, pl.ds(off, bt - off)],
                                            dxe_ref.at[b, pl.ds(0, bt - off), cols])

                @pl.when(jnp.logical_not(first))
                def _():
                    plgpu.copy_smem_to_gmem(dx_smem.at[out], dxe_ref.at[b, pl.ds(t0 + n * bt - off, bt), cols])
            else:
                plgpu.copy_smem_to_gmem(dx_smem.at[out], dxe_ref.at[b, pl.ds(t0 + n * bt, bt), cols])
            return window, ds_prev, bits_prev, tuple(a + d for a, d in zip(dw, tile_dw)), db + tile_db

        _, ds_prev, bits_prev, dw, db = lax.fori_loop(0, tiles, tile, jax.tree.map(lambda x: x * 1, carry))
        for i in range(w):
            part_smem[i] = dw[i]
        part_smem[w] = db

        @pl.when(r == runs - 1)
        def _tail():  # xe rows L .. L+W-2: only outputs t < L read them (ds 0 beyond L)
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            plgpu.commit_smem()  # no thread writes dx_smem[0] before that wait
            ds_tail, bits_tail = ds_prev, bits_prev
            for k in range(w - 1):  # step L + k: its ds is 0, so its keep bits are any (the last output's)
                ds_win, bits_win = (zero,) + ds_tail, ((bits_tail[0],) + bits_tail) if docs else ()
                dx_smem[0, k] = dxe_row(ds_win, bits_win).astype(dx_smem.dtype)
                ds_tail, bits_tail = ds_win[:w - 1], bits_win[:w - 1]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(dx_smem.at[0, pl.ds(0, w - 1)],
                                    dxe_ref.at[b, pl.ds(length - off, w - 1), cols])

        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(part_smem, part_ref.at[b, r, :, cols])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(lax.axis_index("wg") == 1)
    def _memory():
        def issue(n, slot):
            start = t0 + n * bt
            plgpu.copy_gmem_to_smem(xe_ref.at[b, pl.ds(start + w - 1 - off, bt), cols], x_smem.at[slot],
                                    loaded.at[slot])
            plgpu.copy_gmem_to_smem(dy_ref.at[b, pl.ds(start, bt), cols], dy_smem.at[slot], loaded.at[slot])
            if docs:
                plgpu.copy_gmem_to_smem(bits_ref.at[b, pl.ds(start, bt)], bits_smem.at[slot, pl.ds(0, bt)],
                                        loaded.at[slot])

        _stream(tiles, stages, issue, consumed)


# ---------------------------------------------------------------------------------------------------------
# Launches and the custom_vjp.


@dataclasses.dataclass(frozen=True)
class _Launch:
    """What the kernels take besides the arrays (hashable: the custom_vjp's static argument)."""

    activation: str | None
    config: Config
    interpret: bool | plgpu.InterpretGPUParams
    halo: bool  # the array holds xe (the W-1 rows before the piece, then it), else the piece alone (zeros before)

    def offset(self, width: int) -> int:
        """off of the kernels: xe row p is the array's row p - off."""
        return 0 if self.halo else width - 1


def _launch(body, out_type, scratch, grid, launch: _Launch, args):
    # No automatic warpgroup barrier around each shared-memory row store (two per row): the kernels place
    # their own, two per tile (`commit_smem`), as that flag's conditions ask: no thread writes shared memory
    # that another thread reads, and TMA overwrites a stage only after every thread's reads of it.
    kernel = plgpu.kernel(
        body, out_type=out_type, scratch_types=scratch, grid=grid, grid_names=("c", "b", "r"), num_threads=2,
        thread_name="wg", compiler_params=plgpu.CompilerParams(unsafe_no_auto_barriers=True),
        kernel_name="causal_conv" + body.func.__name__.removesuffix("_kernel"),  # for profiles
        interpret=_interpret_params(launch.interpret))
    # plgpu.kernel drops the manual mesh axes its inputs vary over (inside shard_map): outputs vary as xe does.
    return jax.tree.map(lambda a: kernel_support.vary_like(a, args[0]), kernel(*args))


def _interpret_params(interpret) -> plgpu.InterpretGPUParams | None:
    if isinstance(interpret, plgpu.InterpretGPUParams):
        return interpret
    return plgpu.InterpretGPUParams() if interpret else None


# Keep bits per ring slot, rounded up so that every slot starts 128 bytes from the last: a TMA copy into a slot at
# another offset failed with a misaligned address on an H200 (block_t = 16: 64-byte slots; the interpreter does
# not check alignment). TMA fills the slot's first block_t.
_BITS_SLOT = 128 // 4


def _bits_scratch(docs: bool, stages: int, bt: int):
    return plgpu.SMEM((stages, pl.cdiv(bt, _BITS_SLOT) * _BITS_SLOT) if docs else (1, 1), jnp.int32)


def _forward(xe, weight, bias, bits, launch: _Launch):
    """y [B, L, C]; xe [B, W-1+L, C], or [B, L, C] when not launch.halo."""
    bsz, n_rows, c = xe.shape
    w, cfg = weight.shape[0], launch.config
    off = launch.offset(w)
    length = n_rows - (w - 1) + off
    run, docs = cfg.run(length, False), bits is not None
    bt, bc, stages = cfg.block_t, cfg.block_c, cfg.fwd_stages
    scratch = (plgpu.SMEM((stages, bt, bc), xe.dtype), _bits_scratch(docs, stages, bt),
               plgpu.SMEM((2, bt, bc), xe.dtype),
               plgpu.Barrier(num_arrivals=2 if docs else 1, num_barriers=stages),
               plgpu.Barrier(num_arrivals=1, num_barriers=stages))
    body = functools.partial(_forward_kernel, activation=launch.activation, docs=docs, config=cfg, run=run,
                             off=off)
    args = (xe, weight, bias) + ((bits,) if docs else ())
    return _launch(body, jax.ShapeDtypeStruct((bsz, length, c), xe.dtype), scratch,
                   (c // bc, bsz, length // run), launch, args)


def _backward(xe, weight, bias, bits, g, launch: _Launch):
    """(dxe xe's shape and dtype, dweight [W, C] float32, dbias [C] float32)."""
    bsz, n_rows, c = xe.shape
    w, cfg = weight.shape[0], launch.config
    off = launch.offset(w)
    length = n_rows - (w - 1) + off
    run, docs = cfg.run(length, True), bits is not None
    runs = length // run
    bt, bc, stages = cfg.block_t, cfg.block_c, cfg.bwd_stages
    scratch = (plgpu.SMEM((stages, bt, bc), xe.dtype), plgpu.SMEM((stages, bt, bc), xe.dtype),
               _bits_scratch(docs, stages, bt), plgpu.SMEM((2, max(bt, w - 1), bc), xe.dtype),
               plgpu.SMEM((w + 1, bc), _F32),
               plgpu.Barrier(num_arrivals=3 if docs else 2, num_barriers=stages),
               plgpu.Barrier(num_arrivals=1, num_barriers=stages))
    body = functools.partial(_backward_kernel, activation=launch.activation, docs=docs, config=cfg, run=run,
                             runs=runs, off=off)
    args = (xe, weight, bias) + ((bits,) if docs else ()) + (g.astype(xe.dtype),)
    out_type = (jax.ShapeDtypeStruct(xe.shape, xe.dtype), jax.ShapeDtypeStruct((bsz, runs, w + 1, c), _F32))
    dxe, parts = _launch(body, out_type, scratch, (c // bc, bsz, runs), launch, args)
    sums = jnp.sum(parts, axis=(0, 1))
    return dxe, sums[:w], sums[w]


_fused = causal_conv_kernel.differentiable(_forward, _backward)


def convolve(xe, weight, bias, ide, *, activation: str | None = None,
             interpret: bool | plgpu.InterpretGPUParams = False, config: Config = DEFAULT):
    """The convolution of one piece (module docstring), differentiable in xe, weight and bias.

    Args:
      xe: [B, W-1+L, C] floating (`DTYPES`): the W-1 positions before the piece, then the piece.
      weight: [W, C]: weight[W-1] multiplies the current position.   bias: None or [C].
      ide: None, or [B, W-1+L] integers: xe's document ids (a document starts where the id changes).
      activation: None or "silu" (applied to the float32 sum, before the one rounding to xe's dtype).
      interpret: Mosaic GPU's CPU interpreter instead of the compiled kernels (a Hopper GPU): True for its
        defaults, or its plgpu.InterpretGPUParams (the tests' race detection).
      config: block sizes.
    Returns:
      y [B, L, C] in xe's dtype. Gradients: dxe in xe's dtype (the halo rows' too), dweight, dbias float32
      sums in their own dtypes.
    Raises:
      ValueError: an activation not in ACTIVATIONS, mismatched shapes, or a dtype or shape `supported`
      refuses (its platform check is the caller's).
    """
    return _convolve(xe, weight, bias, ide, _Launch(activation, config, interpret, halo=True))


def convolve_zero_halo(x, weight, bias, ids, *, activation: str | None = None,
                       interpret: bool | plgpu.InterpretGPUParams = False, config: Config = DEFAULT):
    """`convolve` of xe = [W-1 rows of zeros; x] (lasp_jax.parallel.causal_conv's zero-padded piece) without
    building xe: the kernels read x and write dx in place of xe's rows (the zeros are selected in, never read),
    saving the pad's copy forward and dxe's slice backward.

    Args:
      x: [B, L, C] floating (`DTYPES`).   weight, bias, activation, interpret, config: as `convolve`'s.
      ids: None, or [B, L] integers: x's document ids (the zeros count as the first position's document; they
        add nothing either way).
    Returns:
      y [B, L, C] in x's dtype, equal to `convolve`'s on xe (the same sums). Gradients: dx in x's dtype, dweight,
      dbias as `convolve`'s.
    Raises:
      ValueError: as `convolve`'s, with `supported(..., halo=False)`.
    """
    ide = None
    if ids is not None:
        if x.ndim != 3 or ids.shape != x.shape[:2]:
            raise ValueError(f"ids {ids.shape}: need [B, L] = {x.shape[:2]}")
        ide = jnp.pad(ids, ((0, 0), (weight.shape[0] - 1, 0)), mode="edge") if weight.ndim == 2 else ids
    return _convolve(x, weight, bias, ide, _Launch(activation, config, interpret, halo=False))


def _convolve(xe, weight, bias, ide, launch: _Launch):
    """Checks, then the custom_vjp; ide [B, W-1+L] (xe's rows, also when the array is the piece alone)."""
    if launch.activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {launch.activation!r}")
    w = weight.shape[0] if weight.ndim == 2 else 0
    what = "xe [B, W-1+L, C]" if launch.halo else "x [B, L, C]"
    if weight.ndim != 2 or xe.ndim != 3 or weight.shape[1] != xe.shape[-1]:
        raise ValueError(f"{what.split()[0]} {xe.shape}, weight {weight.shape}: need {what} and weight [W, C]")
    if bias is not None and bias.shape != (xe.shape[-1],):
        raise ValueError(f"bias {bias.shape}: need [C] with C={xe.shape[-1]}")
    rows = xe.shape[1] + launch.offset(w)
    if ide is not None and ide.shape != (xe.shape[0], rows):
        raise ValueError(f"ide {ide.shape}: need [B, W-1+L] = {(xe.shape[0], rows)}")
    reason = _shape_reason(xe, w, launch.config, launch.halo)  # not the platform: lowering for CUDA from a CPU
    if reason is not None:
        raise ValueError(f"causal_conv_mosaic cannot run these inputs: {reason}")
    bias = jnp.zeros(weight.shape[1:], weight.dtype) if bias is None else bias  # its gradient goes nowhere
    # Inside shard_map: weight and bias vary as xe does (kernel_support's docstring says why).
    weight, bias = kernel_support.vary_like(weight, xe), kernel_support.vary_like(bias, xe)
    bits = None if ide is None else _keep_bits(ide, w)
    return _fused(xe, weight, bias, bits, launch)
