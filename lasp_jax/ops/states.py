"""The d_k x d_v state terms shared by every implementation and by the sequence-parallel machinery.

A piece of L positions interacts with the rest of the sequence only through two fp32 states per head:
the state flowing in, S_in, and the state flowing out, S_end. Every formula here is a [L, d] x [d, d]
product (cheap next to the intra-chunk work) and is written once, for all implementations:

    local_state:        m     = sum_x lambda^(L - x) k_x^T v_x            (S_end of the piece when S_in = 0)
    apply_state:        o_x  += scale lambda^x q_x S_in                   (forward, the incoming state)
    apply_state_dq:     dq_x += scale lambda^x dO_x S_in^T                (backward of the above, w.r.t. q)
    query_state_grad:   d     = scale sum_x lambda^x q_x^T dO_x           (backward of the above, w.r.t. S_in)
    end_state_grads:    dk_x += lambda^(L - x) v_x dS_end^T,  dv_x += lambda^(L - x) k_x dS_end

and the weights that chain such states across devices (prefix_weights: the exclusive decayed prefix and suffix
over items of a fixed length; `decayed` carries a state across a decay factor, selecting 0 past a document start).

Per-token decay and documents (`TokenDecay`, the `*_tokens` functions): rates s_t >= 0 per (b, t, h) and document
starts. The state convention is then the state *after* a position, H_t = exp(-s_t) H_(t-1) + k_t^T v_t (reset to
k_t^T v_t at a document start): S_in reaches local position t as exp(-b_t) with b_t = s_0 + ... + s_t (the piece's
running sum, float32), position t's share of S_end is exp(-e_t) with e_t = s_(t+1) + ... + s_(L-1) (its own reverse
running sum, so that no difference of two large sums is taken), and S_end = exp(-b_(L-1)) S_in + m. Every factor is
exp of something <= 0. A document start at t cuts S_in off from t on, and the positions before it out of S_end
(their weights are zero). The same products as above run with these [B, L, H] weights, and the positions with
zero weights are selected out (`sees_in`, `in_last`: the tokens of a sum, the rows of a product), never
multiplied by 0, so no non-finite value of one document reaches another through these products (0 * NaN
would); `decayed` carries a state across a piece's decay the same way.

Shapes: q [B, L, Hq, Dk], k [B, L, Hk, Dk], v [B, L, Hv, Dv]; dO, outputs, rates and states per output head,
H = max(Hq, Hv): dO [B, L, H, Dv], rates [H] (the decay rates s, lambda = exp(-s)), states [B, H, Dk, Dv]
float32. Output head h reads head h // (H / Hx) of each input (MHA, GQA / MQA, GVA; checks.attention_inputs):
the products view every input as Hs = min(Hq, Hk, Hv) groups of 1 or G = H / Hs heads (`grouped`), so an input
head read by several output heads is indexed, never repeated, and its cotangent sums those heads inside the
float32 contraction (`einsum_to`). Powers are exp(-s * n) with n >= 0, so they only underflow.

Numerics: products accumulate in float32. `scale` (the attention's, a static float) multiplies the float32
decay row of the q-side terms before that row meets the tokens, so q is never rescaled in its own dtype. With
float32 inputs every operand stays float32 at full precision. With bf16 / fp16 inputs the (decay-weighted,
scaled) token operands and the state are rounded to the input dtype, so the products run on the matrix units:
at T=64K, H=16, d=128 on an H200 a product of this form took 0.31 ms against 1.10 ms for apply_state in
full-precision float32 (benchmarks/results/LASP_GPU_NOTES.md), and the rounding is that of the inputs
themselves. XLA:CPU has no bf16 x bf16 -> float32 dot, so on CPU the operands are float32 whatever the input
dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def decay_pow(rates: jax.Array, n) -> jax.Array:
    """lambda^n = exp(-s * n) in float32; n >= 0 (broadcasts)."""
    return jnp.exp(-rates.astype(jnp.float32) * jnp.asarray(n, jnp.float32))


def prefix_weights(rates: jax.Array, stride, rows: int, cols: int) -> jax.Array:
    """[H, rows, cols] float32 w[h, r, j] = lambda_h^(stride (r - 1 - j)) for j < r, else 0.

    Row r weighs the items j before it (pieces of `stride` positions, or ranks with stride 1) by the decay from
    the end of item j to the start of item r: sum_j w[h, r, j] m_j is the exclusive decayed prefix entering r,
    and sum_r w[h, r, j] d_r (the transpose) the exclusive decayed suffix leaving j. rates [H]."""
    r = jnp.arange(rows, dtype=jnp.float32)[:, None]
    j = jnp.arange(cols, dtype=jnp.float32)[None, :]
    gap = r - 1.0 - j
    power = decay_pow(jnp.asarray(rates)[:, None, None], jnp.asarray(stride, jnp.float32) * jnp.maximum(gap, 0.0))
    return jnp.where(gap >= 0, power, 0.0)


def grouped(x: jax.Array, groups: int) -> jax.Array:
    """x [..., Hx, D] viewed as [..., groups, Hx // groups, D]: head s * G + g of the output reads head
    s * (Hx // groups) + g of x when x has all H heads, head s when it has one per group (Hx = groups; the size-1
    axis broadcasts in jnp.einsum and jnp.where, so nothing is repeated in memory)."""
    return x.reshape(*x.shape[:-2], groups, -1, x.shape[-1])


def head_groups(*xs: jax.Array) -> int:
    """The number of head groups: the fewest heads among q, k, v ([..., heads, D] each)."""
    return min(x.shape[-2] for x in xs)


def einsum_to(spec: str, *operands, group: int, **kwargs) -> jax.Array:
    """jnp.einsum whose output's axis `g` (the output heads of one group) has size `group`: G (one entry per
    output head) or 1 (the cotangent of an input with one head per group: the group's heads are summed inside
    the contraction, in its float32 accumulation, and the axis is kept with size 1)."""
    if group == 1:
        inputs, out = spec.split("->")
        return jnp.expand_dims(jnp.einsum(f"{inputs}->{out.replace('g', '')}", *operands, **kwargs), out.index("g"))
    return jnp.einsum(spec, *operands, **kwargs)


def decayed(a: jax.Array, x: jax.Array) -> jax.Array:
    """a * x, and 0 where a == 0 (selected): a state carried across a decay factor a >= 0 (broadcasting). a = 0
    past a document start, so a non-finite state of one document never reaches the next (0 * NaN would). A NaN
    factor (a traced bad rate) still multiplies, so the states after it stay NaN rather than silently finite."""
    return jnp.where(a == 0, 0.0, a * x)


def _compute_dtype(x):
    """(operand dtype, precision) for products of tokens of x's dtype; see the module's numerics."""
    if jnp.dtype(x.dtype).itemsize < 4 and jax.default_backend() != "cpu":
        return x.dtype, jax.lax.Precision.DEFAULT
    return jnp.float32, _HIGHEST


def _einsum(spec, a, b, dtype, precision, group=None):
    a, b = a.astype(dtype), b.astype(dtype)
    if group is None:
        return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=jnp.float32)
    return einsum_to(spec, a, b, group=group, precision=precision, preferred_element_type=jnp.float32)


def _selected(x, keep):
    """x [B, L, ...] with the positions outside keep [B, L] bool (None: all kept) selected to 0."""
    return x if keep is None else jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x, 0.0)


def _weight_groups(w, groups):
    """Weights [..., H] per output head as [..., groups, H / groups]."""
    return w.reshape(*w.shape[:-1], groups, -1)


def _position_decay(rates, length, from_end, scale=1.0):
    """[1, L, H] weights scale lambda^x (or scale lambda^(L - x) when from_end), float32."""
    x = jnp.arange(length, dtype=jnp.float32)
    n = length - x if from_end else x
    return scale * decay_pow(rates[None, None], n[None, :, None])


def _state_sum(k, v, w, keep=None):
    """sum_x w_x k_x^T v_x per output head over the positions in keep. k [B,L,Hk,Dk], v [B,L,Hv,Dv], w [1 or B,
    L, H], keep [B, L] bool or None -> [B, H, Dk, Dv] float32."""
    b, length, _, dim_k = k.shape
    n_heads, groups = w.shape[-1], head_groups(k, v)
    dtype, precision = _compute_dtype(k)
    kw = _weight_groups(w, groups)[..., None] * _selected(grouped(k, groups).astype(jnp.float32), keep)
    m = _einsum("btkgd,btkge->bkgde", kw, _selected(grouped(v, groups), keep), dtype, precision)
    return m.reshape(b, n_heads, dim_k, v.shape[-1])


def _apply(q, w, state, keep=None):
    """w_x q_x S per output head, 0 outside keep (selected: a non-finite S reaches no position outside it).
    q [B,L,Hq,Dk], w [1 or B, L, H], state [B,H,Dk,Dv] -> [B,L,H,Dv] float32."""
    b, length, hq, dim_k = q.shape
    dtype, precision = _compute_dtype(q)
    wq = _weight_groups(w, hq)[..., None] * grouped(q, hq).astype(jnp.float32)  # [B, L, Hq, H / Hq, Dk]
    o = _einsum("btkgd,bkgde->btkge", wq, state.reshape(b, hq, -1, dim_k, state.shape[-1]), dtype, precision)
    return _selected(o.reshape(b, length, -1, state.shape[-1]), keep)


def _apply_dq(do, w, state, hq, keep=None):
    """w_x dO_x S^T per query head (summed over the output heads reading it), 0 outside keep. do [B,L,H,Dv],
    w [1 or B, L, H], state [B,H,Dk,Dv] -> [B,L,Hq,Dk] float32."""
    b, length, n_heads, dim_v = do.shape
    dtype, precision = _compute_dtype(do)
    wdo = _weight_groups(w, hq)[..., None] * grouped(do, hq).astype(jnp.float32)
    dq = _einsum("btkge,bkgde->btkgd", wdo, state.reshape(b, hq, -1, state.shape[2], dim_v), dtype, precision,
                 group=1 if hq < n_heads else None)
    return _selected(dq.reshape(b, length, hq, -1), keep)


def _query_sum(q, do, w, keep=None):
    """sum_x w_x q_x^T dO_x per output head over the positions in keep. q [B,L,Hq,Dk], do [B,L,H,Dv] -> [B,H,Dk,Dv]."""
    b, _, hq, dim_k = q.shape
    dtype, precision = _compute_dtype(q)
    wq = _weight_groups(w, hq)[..., None] * _selected(grouped(q, hq).astype(jnp.float32), keep)
    d = _einsum("btkgd,btkge->bkgde", wq, _selected(grouped(do, hq), keep), dtype, precision)
    return d.reshape(b, -1, dim_k, do.shape[-1])


def _end_grads(k, v, w, ds_end, keep=None):
    """w [1 or B, L, H]; see end_state_grads (0 outside keep, selected)."""
    b, length, hk, dim_k = k.shape
    hv, dim_v = v.shape[2], v.shape[-1]
    groups = head_groups(k, v)
    dtype, precision = _compute_dtype(k)
    w = _weight_groups(w, groups)[..., None]
    g = ds_end.reshape(b, groups, -1, dim_k, dim_v)
    vw = w * grouped(v, groups).astype(jnp.float32)  # [B, L, Hs, G, Dv]
    kw = w * grouped(k, groups).astype(jnp.float32)
    dk = _einsum("btkge,bkgde->btkgd", vw, g, dtype, precision, group=hk // groups)
    dv = _einsum("btkgd,bkgde->btkge", kw, g, dtype, precision, group=hv // groups)
    return _selected(dk.reshape(b, length, hk, dim_k), keep), _selected(dv.reshape(b, length, hv, dim_v), keep)


def local_state(k, v, rates):
    """State at the end of the piece with S_in = 0. k [B,L,Hk,Dk], v [B,L,Hv,Dv], rates [H] -> [B,H,Dk,Dv]."""
    return _state_sum(k, v, _position_decay(rates, k.shape[1], from_end=True))


def apply_state(q, rates, state, scale=1.0):
    """scale lambda^x q_x S_in for every local x. q [B,L,Hq,Dk], state [B,H,Dk,Dv] -> [B,L,H,Dv] float32."""
    return _apply(q, _position_decay(rates, q.shape[1], False, scale), state)


def apply_state_dq(do, rates, state, scale=1.0, hq=None):
    """scale lambda^x dO_x S_in^T per query head. do [B,L,H,Dv], state [B,H,Dk,Dv] -> [B,L,Hq,Dk] float32;
    hq: q's head count (default H)."""
    return _apply_dq(do, _position_decay(rates, do.shape[1], False, scale), state, hq or do.shape[2])


def query_state_grad(q, do, rates, scale=1.0):
    """scale sum_x lambda^x q_x^T dO_x, the cotangent of S_in. q [B,L,Hq,Dk], do [B,L,H,Dv] -> [B,H,Dk,Dv]."""
    return _query_sum(q, do, _position_decay(rates, q.shape[1], False, scale))


def end_state_grads(k, v, rates, ds_end):
    """Cotangents of k and v through S_end. k [B,L,Hk,Dk], v [B,L,Hv,Dv], ds_end [B,H,Dk,Dv] -> (dk, dv) f32."""
    return _end_grads(k, v, _position_decay(rates, k.shape[1], from_end=True), ds_end)


class TokenDecay(NamedTuple):
    """Per-token decay of one piece of L positions (see the module docstring). B, L, H as in q."""

    rates: jax.Array  # [B, L, H] float32, s_t >= 0
    starts: jax.Array  # [B, L] bool: a document starts at t (at t = 0: it starts at the piece's first position)
    counts: jax.Array  # [B, L] int32: document starts in (0, t]; t and r are in one document iff equal
    cumulative: jax.Array  # [B, L, H] float32 b_t = s_0 + ... + s_t
    q_weight: jax.Array  # [B, L, H] float32 exp(-b_t) where no document starts in [0, t], else 0
    k_weight: jax.Array  # [B, L, H] float32 exp(-e_t) where no document starts in (t, L), else 0
    log_decay: jax.Array  # [B, H] float32 b_(L-1), +inf where a document starts in the piece


def document_starts(segment_ids: jax.Array) -> jax.Array:
    """[B, L] bool: a document starts at t > 0 where segment_ids [B, L] (any integers) differs from t - 1's; False
    at t = 0 (whether the piece's first position starts one is the previous piece's business: `cut_at_first`).
    An id that recurs after another starts a new document."""
    return jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, 0)))


def document_numbers(segment_ids: jax.Array) -> jax.Array:
    """[B, L] int32 document numbers 0, 1, ...: the starts (`document_starts`) in (0, t]. Positions t and r are
    in one document iff their numbers are equal."""
    return jnp.cumsum(document_starts(segment_ids).astype(jnp.int32), axis=1)


def token_decay(rates: jax.Array, starts: jax.Array) -> TokenDecay:
    """The piece's tables from its rates [B, L, H] (>= 0) and document starts [B, L] bool (starts[:, 0] False: a
    start at the first position is `cut_at_first`'s)."""
    rates = rates.astype(jnp.float32)
    counts = jnp.cumsum(starts.astype(jnp.int32), axis=1)
    cumulative = jnp.cumsum(rates, axis=1)
    later = jnp.pad(rates[:, 1:], ((0, 0), (0, 1), (0, 0)))  # s_(t+1), 0 after the last
    after = jnp.flip(jnp.cumsum(jnp.flip(later, 1), axis=1), 1)  # e_t
    sees_in = (counts == 0)[..., None]
    in_last = (counts == counts[:, -1:])[..., None]
    return TokenDecay(
        rates=rates, starts=starts, counts=counts, cumulative=cumulative,
        q_weight=jnp.where(sees_in, jnp.exp(-cumulative), 0.0),
        k_weight=jnp.where(in_last, jnp.exp(-after), 0.0),
        log_decay=jnp.where(sees_in[:, -1], cumulative[:, -1], jnp.inf),
    )


def cut_at_first(tok: TokenDecay, first: jax.Array) -> TokenDecay:
    """tok with a document starting at the piece's first position where first [B] is True: S_in reaches no
    position and passes no further. The pair tables (cumulative, counts) do not change, so the piece's own work
    never waits for `first` (a collective, under sequence parallelism)."""
    return tok._replace(starts=tok.starts.at[:, 0].set(first),
                        q_weight=jnp.where(first[:, None, None], 0.0, tok.q_weight),
                        log_decay=jnp.where(first[:, None], jnp.inf, tok.log_decay))


def piece_decay(tok: TokenDecay) -> jax.Array:
    """[B, H] exp(-b_(L-1)), 0 where a document starts in the piece: S_end = piece_decay S_in + m."""
    return jnp.exp(-tok.log_decay)


def sees_in(tok: TokenDecay) -> jax.Array:
    """[B, L] bool: no document starts in [0, t], so S_in reaches t (q_weight's nonzero pattern, by position)."""
    return (tok.counts == 0) & ~tok.starts[:, :1]


def in_last(tok: TokenDecay) -> jax.Array:
    """[B, L] bool: t is in the piece's last document, so it reaches S_end (k_weight's nonzero pattern)."""
    return tok.counts == tok.counts[:, -1:]


def local_state_tokens(k, v, tok: TokenDecay):
    """m = sum_x exp(-e_x) k_x^T v_x over the piece's last document (S_in = 0) -> [B, H, Dk, Dv] float32."""
    return _state_sum(k, v, tok.k_weight, in_last(tok))


def apply_state_tokens(q, tok: TokenDecay, state, scale=1.0):
    """scale exp(-b_x) q_x S_in for the positions before the piece's first document start -> [B,L,H,Dv] f32."""
    return _apply(q, scale * tok.q_weight, state, sees_in(tok))


def apply_state_dq_tokens(do, tok: TokenDecay, state, scale=1.0, hq=None):
    """scale exp(-b_x) dO_x S_in^T (before the first start) per query head -> [B, L, Hq, Dk] float32; hq: q's
    head count (default H)."""
    return _apply_dq(do, scale * tok.q_weight, state, hq or do.shape[2], sees_in(tok))


def query_state_grad_tokens(q, do, tok: TokenDecay, scale=1.0):
    """scale sum_x exp(-b_x) q_x^T dO_x (before the first start), the cotangent of S_in -> [B, H, Dk, Dv]."""
    return _query_sum(q, do, scale * tok.q_weight, sees_in(tok))


def end_state_grads_tokens(k, v, tok: TokenDecay, ds_end):
    """Cotangents of k and v through S_end (the last document's positions) -> (dk, dv) float32."""
    return _end_grads(k, v, tok.k_weight, ds_end, in_last(tok))


def end_state_shares(k, v, tok: TokenDecay, ds_end):
    """[B, L, H] float32 exp(-e_x) k_x . (dS_end v_x) per output head: k_x . dk_x of end_state_grads_tokens, one
    term per head (the decay gradient needs them per head under GQA / GVA); 0 outside the last document."""
    b, length, _, dim_k = k.shape
    groups = head_groups(k, v)
    dtype, precision = _compute_dtype(k)
    g = ds_end.reshape(b, groups, -1, dim_k, v.shape[-1])
    kg = _einsum("btkgd,bkgde->btkge", grouped(k, groups), g, dtype, precision)
    share = jnp.sum(kg * grouped(v, groups).astype(jnp.float32), axis=-1)  # [B, L, Hs, G]
    return _selected(tok.k_weight * share.reshape(b, length, -1), in_last(tok))


def document_suffix_sum(x: jax.Array, starts: jax.Array) -> jax.Array:
    """sum_{t >= u, t in u's document} x_t for x [B, L, H] float32, starts [B, L] bool (a per-document reverse
    cumulative sum: later documents never enter it, not even as rounding)."""
    last = jnp.pad(starts[:, 1:], ((0, 0), (0, 1)), constant_values=True)  # t ends its document in the piece

    def combine(left, right):
        (f1, x1), (f2, x2) = left, right
        return f1 | f2, jnp.where(f2, x2, x1 + x2)

    _, total = jax.lax.associative_scan(combine, (last[..., None], x), axis=1, reverse=True)
    return total
