"""The Triton kernels behind the fused GRPO loss: per-row softmax statistics, per-token loss, dlogits.

Imported lazily by ``grpo_loss.py`` so that, on a machine without CUDA, TRITON_INTERPRET=1 can be
set before the ``@triton.jit`` decorators run (Triton reads that switch at decoration time).

The two vocabulary kernels give one program to one row (token) of a [N, V_local] logits shard and
stream the vocabulary in BLOCK_V columns with fp32 registers: the grid is flat over tokens, so N
is only bounded by the 2**31 - 1 limit of grid axis 0, not the 65,535 of axes 1 and 2. Between
them, ``token_loss_kernel`` does the O(N) per-token work in one launch: merging the shards'
statistics (after the one all_gather of tensor parallelism) and the loss with its derivative.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _rebase(m, s, w, shift):
    """Re-express a softmax partial (s = sum e^(z-m), w = sum e^(z-m) (z-m)) relative to shift >= m.

    s' = s e^(m-shift), w' = e^(m-shift) (w + (m-shift) s). The select comes before the product so
    that 0 * -inf is never formed (an empty partial has s = 0 and m = -inf). Elementwise: per row,
    per token block or per rank.
    """
    alpha = tl.exp2((m - shift) * LOG2E)
    return s * alpha, alpha * (w + tl.where(s > 0, m - shift, 0.0) * s)


@triton.jit
def _shift_of(m):
    """The shift for a running max m: m itself, or 0 while everything seen is -inf (no -inf - -inf NaN)."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def _dlogits(logq, is_target, c_logp, c_ent, ent, HAS_G_ENT: tl.constexpr):
    """d L / d z for z = logits / T: c_logp (onehot - p) - c_ent p (log p + H), with p = exp(logq).

    c_logp = dL/dlogp_target and c_ent = dL/dH of the row (scalars, or [BLOCK_N, 1] columns that
    broadcast over a tile); p == 0 (z = -inf) contributes 0, not 0 * inf.
    """
    p = tl.exp2(logq * LOG2E)
    d = tl.where(is_target, c_logp - c_logp * p, -c_logp * p)
    if HAS_G_ENT:
        d -= c_ent * p * (tl.where(p > 0, logq, 0.0) + ent)
    return d


@triton.jit
def _grad_coefficients(offs, inside, valid_ptr, dloss_ptr, dkl_ptr,
                       g_loss_ptr, g_loss_stride, g_logp_ptr, g_logp_stride, g_kl_ptr, g_kl_stride,
                       g_ent_ptr, g_ent_stride,
                       HAS_G_LOSS: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_KL: tl.constexpr,
                       HAS_G_ENT: tl.constexpr):
    """(c_logp, c_ent) of tokens ``offs``: the upstream gradients of the loss, logp, kl and entropy outputs
    (strided [N] tensors; stride 0 for an expanded one) times the loss's d/dlogp; 0 for masked tokens."""
    keep = (tl.load(valid_ptr + offs, mask=inside, other=0) != 0).to(tl.float32)
    c_logp = keep * 0.0
    if HAS_G_LOSS:
        c_logp += tl.load(g_loss_ptr + offs * g_loss_stride, mask=inside, other=0.0) * \
            tl.load(dloss_ptr + offs, mask=inside, other=0.0)
    if HAS_G_LOGP:
        c_logp += tl.load(g_logp_ptr + offs * g_logp_stride, mask=inside, other=0.0) * keep
    if HAS_G_KL:
        c_logp += tl.load(g_kl_ptr + offs * g_kl_stride, mask=inside, other=0.0) * \
            tl.load(dkl_ptr + offs, mask=inside, other=0.0)
    c_ent = keep * 0.0
    if HAS_G_ENT:
        c_ent = tl.load(g_ent_ptr + offs * g_ent_stride, mask=inside, other=0.0) * keep
    return c_logp, c_ent


@triton.jit
def row_stats_kernel(
    logits_ptr, row_stride, targets_ptr, valid_ptr, stats_ptr,
    V, vocab_start, inv_temp,
    BLOCK_V: tl.constexpr, HAS_VALID: tl.constexpr, WITH_ENTROPY: tl.constexpr,
):
    """One pass online softmax over this rank's vocab shard of z = logits / T.

    Writes (m, s, w, t, found) per row: m = max z, s = sum exp(z - m),
    w = sum exp(z - m) * (z - m) (entropy partial, relative to m so it never cancels),
    t = z[target] when the target id falls in this shard (found = 1), else t = found = 0.
    Masked rows are skipped (their logits are never read) and get the neutral (0, 1, 0, 0, 0).
    """
    row = tl.program_id(0).to(tl.int64)
    out = stats_ptr + row * 5
    keep = True
    if HAS_VALID:
        keep = tl.load(valid_ptr + row) != 0
    if keep:
        base = logits_ptr + row * row_stride
        # -inf is the identity of max: all-equal rows and +-1e4 logits need no special case.
        m = float("-inf")
        s = 0.0
        w = 0.0
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            z = tl.load(base + cols, mask=cols < V, other=NEG_INF).to(tl.float32) * inv_temp
            m_new = tl.maximum(m, tl.max(z, axis=0))
            shift = _shift_of(m_new)
            s, w = _rebase(m, s, w, shift)
            e = tl.exp2((z - shift) * LOG2E)
            if WITH_ENTROPY:
                w += tl.sum(e * tl.where(e > 0, z - shift, 0.0), axis=0)
            s += tl.sum(e, axis=0)
            m = m_new
        tgt = tl.load(targets_ptr + row).to(tl.int64) - vocab_start
        found = (tgt >= 0) & (tgt < V)
        t = tl.load(base + tgt, mask=found, other=0.0).to(tl.float32) * inv_temp
        tl.store(out, m)
        tl.store(out + 1, s)
        tl.store(out + 2, w)
        tl.store(out + 3, t)
        tl.store(out + 4, found.to(tl.float32))
    else:
        tl.store(out, 0.0)
        tl.store(out + 1, 1.0)
        tl.store(out + 2, 0.0)
        tl.store(out + 3, 0.0)
        tl.store(out + 4, 0.0)


@triton.jit
def _clamp_and_grad(x, low, high):
    """clamp(x, low, high) and its derivative: 1 on the closed interval (as torch.clamp), else 0."""
    return tl.minimum(tl.maximum(x, low), high), ((x >= low) & (x <= high)).to(tl.float32)


@triton.jit
def _max_grad(a, b, da, db):
    """Derivative of max(a, b): the larger side's, the mean of both on a tie (as torch.maximum)."""
    return tl.where(a > b, da, tl.where(a < b, db, 0.5 * (da + db)))


@triton.jit
def token_loss_kernel(
    parts_ptr, world, n_tokens, valid_ptr, adv_ptr, old_ptr, ref_ptr,
    loss_ptr, logp_ptr, kl_ptr, clipped_ptr, entropy_ptr, softmax_ptr, dloss_ptr, dkl_ptr,
    eps_low, eps_high, dual_clip, beta_kl, logratio_clamp, kl_clamp,
    BLOCK_N: tl.constexpr, HAS_VALID: tl.constexpr, WITH_LOSS: tl.constexpr,
    HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr,
):
    """Per token: merge the [world, N, 5] shard partials, then the GRPO loss and its d/dlogp.

    Writes logp (and with WITH_LOSS: loss, kl, clipped, entropy, and for backward dloss/dlogp and
    dkl/dlogp) plus (M, log S, H, found) into ``softmax_ptr`` [N, 4]. The loss is ALGORITHM.md
    section 6 as written in megatron_selfjudge/loss.py; where a clamp is active its term's
    derivative is 0. Masked tokens get all-zero outputs; their old/ref/advantage values are never used.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = offs < n_tokens
    row_max = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for rank in range(world):
        m = tl.load(parts_ptr + (rank * n_tokens + offs) * 5, mask=inside, other=0.0)
        row_max = tl.maximum(row_max, m)
    # A row that is -inf on every rank has no softmax; shifting by 0 keeps the arithmetic NaN-free.
    shift = _shift_of(row_max)
    total = tl.zeros([BLOCK_N], tl.float32)
    rebased = tl.zeros([BLOCK_N], tl.float32)
    target = tl.zeros([BLOCK_N], tl.float32)
    found = tl.zeros([BLOCK_N], tl.float32)
    for rank in range(world):
        part = parts_ptr + (rank * n_tokens + offs) * 5
        m = tl.load(part, mask=inside, other=0.0)
        s_rank, w_rank = _rebase(m, tl.load(part + 1, mask=inside, other=1.0), tl.load(part + 2, mask=inside, other=0.0),
                                 shift)
        total += s_rank
        rebased += w_rank
        target += tl.load(part + 3, mask=inside, other=0.0)
        found += tl.load(part + 4, mask=inside, other=0.0)
    log_sum = tl.log(total)
    entropy = log_sum - rebased / total
    valid = inside
    if HAS_VALID:
        valid = inside & (tl.load(valid_ptr + offs, mask=inside, other=0) != 0)
    # (z_t - M) - log S: exactly 0 when the target is the unique max, never above 0.
    logp = tl.where(valid, (target - shift) - log_sum, 0.0)
    tl.store(logp_ptr + offs, logp, mask=inside)
    tl.store(softmax_ptr + offs * 4, shift, mask=inside)
    tl.store(softmax_ptr + offs * 4 + 1, log_sum, mask=inside)
    tl.store(softmax_ptr + offs * 4 + 2, entropy, mask=inside)
    tl.store(softmax_ptr + offs * 4 + 3, tl.where(valid, found, 1.0), mask=inside)
    if WITH_LOSS:
        adv = tl.where(valid, tl.load(adv_ptr + offs, mask=inside, other=0.0), 0.0)
        # On-policy (no old log-probs): old == logp, so the ratio is exactly 1.
        old = logp
        if HAS_OLD:
            old = tl.where(valid, tl.load(old_ptr + offs, mask=inside, other=0.0), 0.0)
        logratio, dlogratio = _clamp_and_grad(logp - old, -logratio_clamp, logratio_clamp)
        ratio = tl.exp2(logratio * LOG2E)
        pg_unclipped = -adv * ratio
        d_unclipped = pg_unclipped * dlogratio  # d ratio / d logp = ratio inside the clamp
        ratio_clipped, dclip = _clamp_and_grad(ratio, 1.0 - eps_low, 1.0 + eps_high)
        pg_clipped = -adv * ratio_clipped
        pg = tl.maximum(pg_unclipped, pg_clipped)
        dpg = _max_grad(pg_unclipped, pg_clipped, d_unclipped, d_unclipped * dclip)
        # Dual clip for A < 0: min(pg, -c A), whose bound does not depend on logp.
        floor = -dual_clip * adv
        negative = adv < 0
        dpg = tl.where(negative, _max_grad(-pg, -floor, dpg, 0.0), dpg)
        pg = tl.where(negative, tl.minimum(pg, floor), pg)
        kl = tl.zeros([BLOCK_N], tl.float32)
        dkl = tl.zeros([BLOCK_N], tl.float32)
        if HAS_REF:
            ref = tl.where(valid, tl.load(ref_ptr + offs, mask=inside, other=0.0), 0.0)
            # k3 = exp(d) - d - 1 with d = ref - logp, so dk3/dlogp = -(exp(d) - 1).
            diff, ddiff = _clamp_and_grad(ref - logp, -logratio_clamp, logratio_clamp)
            exp_diff = tl.exp2(diff * LOG2E)
            kl, dk3 = _clamp_and_grad(exp_diff - diff - 1.0, -kl_clamp, kl_clamp)
            dkl = -(exp_diff - 1.0) * ddiff * dk3
        keep = valid.to(tl.float32)
        tl.store(loss_ptr + offs, (pg + beta_kl * kl) * keep, mask=inside)
        tl.store(kl_ptr + offs, kl * keep, mask=inside)
        tl.store(clipped_ptr + offs, (pg_clipped > pg_unclipped).to(tl.float32) * keep, mask=inside)
        tl.store(entropy_ptr + offs, entropy * keep, mask=inside)
        tl.store(dloss_ptr + offs, (dpg + beta_kl * dkl) * keep, mask=inside)
        tl.store(dkl_ptr + offs, dkl * keep, mask=inside)


@triton.jit
def row_grad_kernel(
    logits_ptr, row_stride, grad_ptr, grad_stride, targets_ptr, valid_ptr, softmax_ptr, dloss_ptr, dkl_ptr,
    g_loss_ptr, g_loss_stride, g_logp_ptr, g_logp_stride, g_kl_ptr, g_kl_stride, g_ent_ptr, g_ent_stride,
    V, vocab_start, inv_temp,
    BLOCK_V: tl.constexpr, HAS_G_LOSS: tl.constexpr, HAS_G_LOGP: tl.constexpr, HAS_G_KL: tl.constexpr,
    HAS_G_ENT: tl.constexpr,
):
    """dlogits for one row: (c_logp * (onehot - p) - c_ent * p * (log p + H)) / T, rounded once.

    c_logp = dL/dlogp_target gathers the upstream gradients of the loss, logp and KL outputs
    (each a strided [N] tensor; stride 0 for an expanded one), c_ent = dL/dH that of the entropy.
    The merged (global over tensor-parallel ranks) max M and log-sum-exp offset log S come from
    ``softmax_ptr``, so p = exp((z - M) - log S) stays exact near the max. Rows whose coefficients
    are both 0 (masked tokens) only write zeros and never read logits, which also keeps the
    in-place variant (grad_ptr == logits_ptr) safe row by row.
    """
    row = tl.program_id(0).to(tl.int64)
    c_logp, c_ent = _grad_coefficients(row, True, valid_ptr, dloss_ptr, dkl_ptr, g_loss_ptr, g_loss_stride,
                                       g_logp_ptr, g_logp_stride, g_kl_ptr, g_kl_stride, g_ent_ptr, g_ent_stride,
                                       HAS_G_LOSS, HAS_G_LOGP, HAS_G_KL, HAS_G_ENT)
    gbase = grad_ptr + row * grad_stride
    if (c_logp == 0.0) & (c_ent == 0.0):
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            tl.store(gbase + cols, tl.zeros([BLOCK_V], tl.float32).to(grad_ptr.dtype.element_ty), mask=cols < V)
    else:
        base = logits_ptr + row * row_stride
        row_max = tl.load(softmax_ptr + row * 4)
        log_sum = tl.load(softmax_ptr + row * 4 + 1)
        ent = tl.load(softmax_ptr + row * 4 + 2)
        tgt = tl.load(targets_ptr + row).to(tl.int64) - vocab_start
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            in_row = cols < V
            # Padding lanes load -inf so p == 0 there (0.0 could overflow exp for a very negative max).
            z = tl.load(base + cols, mask=in_row, other=NEG_INF).to(tl.float32) * inv_temp
            d = _dlogits((z - row_max) - log_sum, cols == tgt, c_logp, c_ent, ent, HAS_G_ENT)
            tl.store(gbase + cols, (d * inv_temp).to(grad_ptr.dtype.element_ty), mask=in_row)


# ---------------------------------------------------------------- fused linear: hidden states in, no logits

@triton.jit
def _logits_tile(h_ptr, h_stride, w_ptr, w_stride, rows, row_ok, cols, col_ok, H, inv_temp,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 DOT_FP32: tl.constexpr, IEEE: tl.constexpr):
    """z = (hidden[rows] @ weight[cols]^T) / T as an fp32 [BLOCK_N, BLOCK_V] tile, through tl.dot.

    Out-of-range rows/columns read zeros (the caller masks columns to -inf). DOT_FP32 casts the
    operands to fp32 first (Triton's interpreter needs it); IEEE asks for exact fp32 products
    instead of TF32 when the operands are fp32 on a GPU.
    """
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        h = tl.load(h_ptr + rows[:, None] * h_stride + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * w_stride + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    return acc * inv_temp


@triton.jit
def linear_row_stats_kernel(
    h_ptr, h_stride, w_ptr, w_stride, targets_ptr, valid_ptr, stats_ptr,
    N, V, H, vocab_start, cols_per_split, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, HAS_VALID: tl.constexpr,
    WITH_ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """``row_stats_kernel``'s (m, s, w, t, found) for BLOCK_N tokens, from hidden states and this shard's weight.

    Program (i, j) streams columns [j * cols_per_split, (j + 1) * cols_per_split) of the vocabulary in
    BLOCK_V tiles; every logits tile is computed by ``_logits_tile`` in fp32 and folded into the
    online softmax at once, so no logits reach memory. Each vocabulary split writes its own partial
    to stats[j] (a [splits, N, 5] tensor): splits are merged exactly like tensor-parallel shards, and
    they give the GPU enough programs when N / BLOCK_N alone would not fill it.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1).to(tl.int64)
    col_lo = split * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, V)
    inside = rows < N
    keep = inside
    if HAS_VALID:
        keep = inside & (tl.load(valid_ptr + rows, mask=inside, other=0) != 0)
    tgt = tl.load(targets_ptr + rows, mask=inside, other=0).to(tl.int64) - vocab_start
    found = (tgt >= col_lo) & (tgt < col_hi)
    tgt = tl.where(found, tgt, -1)  # a target in another shard or split must not meet this tile's padding columns
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    w = tl.zeros([BLOCK_N], tl.float32)
    t = tl.zeros([BLOCK_N], tl.float32)
    for v0 in range(col_lo, col_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < col_hi
        z = _logits_tile(h_ptr, h_stride, w_ptr, w_stride, rows, keep, cols, col_ok, H, inv_temp,
                         BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, IEEE)
        z = tl.where(col_ok[None, :], z, NEG_INF)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = _shift_of(m_new)
        s, w = _rebase(m, s, w, shift)
        e = tl.exp2((z - shift[:, None]) * LOG2E)
        if WITH_ENTROPY:
            w += tl.sum(e * tl.where(e > 0, z - shift[:, None], 0.0), axis=1)
        s += tl.sum(e, axis=1)
        m = m_new
        t += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = stats_ptr + (split * N + rows) * 5
    # Masked rows get row_stats_kernel's neutral (0, 1, 0, 0, 0).
    tl.store(out, tl.where(keep, m, 0.0), mask=inside)
    tl.store(out + 1, tl.where(keep, s, 1.0), mask=inside)
    tl.store(out + 2, tl.where(keep, w, 0.0), mask=inside)
    tl.store(out + 3, tl.where(keep, t, 0.0), mask=inside)
    tl.store(out + 4, tl.where(keep, found.to(tl.float32), 0.0), mask=inside)


@triton.jit
def linear_dlogits_kernel(
    h_ptr, h_stride, w_ptr, w_stride, grad_ptr, grad_stride, targets_ptr, valid_ptr, softmax_ptr, dloss_ptr,
    dkl_ptr, g_loss_ptr, g_loss_stride, g_logp_ptr, g_logp_stride, g_kl_ptr, g_kl_stride, g_ent_ptr, g_ent_stride,
    row_start, row_stop, V, H, vocab_start, inv_temp,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, HAS_G_LOSS: tl.constexpr,
    HAS_G_LOGP: tl.constexpr, HAS_G_KL: tl.constexpr, HAS_G_ENT: tl.constexpr, DOT_FP32: tl.constexpr,
    IEEE: tl.constexpr,
):
    """dL/dlogits of one [BLOCK_N, BLOCK_V] tile of the token chunk [row_start, row_stop), recomputed from h and W.

    Row r of the chunk is written to grad_ptr + (r - row_start) * grad_stride: the caller's chunk
    buffer, from which d_hidden = g @ W and d_weight += g^T @ h are two plain GEMMs. The formula
    is ``row_grad_kernel``'s (``_dlogits``, ``_grad_coefficients``), rounded once to the buffer's dtype.
    """
    rows = row_start + tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    inside = rows < row_stop
    col_ok = cols < V
    c_logp, c_ent = _grad_coefficients(rows, inside, valid_ptr, dloss_ptr, dkl_ptr, g_loss_ptr, g_loss_stride,
                                       g_logp_ptr, g_logp_stride, g_kl_ptr, g_kl_stride, g_ent_ptr, g_ent_stride,
                                       HAS_G_LOSS, HAS_G_LOGP, HAS_G_KL, HAS_G_ENT)
    row_max = tl.load(softmax_ptr + rows * 4, mask=inside, other=0.0)
    log_sum = tl.load(softmax_ptr + rows * 4 + 1, mask=inside, other=0.0)
    ent = tl.load(softmax_ptr + rows * 4 + 2, mask=inside, other=0.0)
    tgt = tl.load(targets_ptr + rows, mask=inside, other=0).to(tl.int64) - vocab_start
    live = inside & ((c_logp != 0.0) | (c_ent != 0.0))  # masked tokens: zeros, and their h is never read
    z = _logits_tile(h_ptr, h_stride, w_ptr, w_stride, rows, live, cols, col_ok, H, inv_temp,
                     BLOCK_N, BLOCK_V, BLOCK_H, DOT_FP32, IEEE)
    z = tl.where(col_ok[None, :], z, NEG_INF)
    d = _dlogits((z - row_max[:, None]) - log_sum[:, None], cols[None, :] == tgt[:, None], c_logp[:, None],
                 c_ent[:, None], ent[:, None], HAS_G_ENT)
    d = tl.where(live[:, None], d * inv_temp, 0.0)
    out = grad_ptr + (rows - row_start)[:, None] * grad_stride + cols[None, :]
    tl.store(out, d.to(grad_ptr.dtype.element_ty), mask=inside[:, None] & col_ok[None, :])
