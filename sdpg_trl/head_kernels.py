"""The LM-head kernels: what SDPG needs from the vocabulary projection, one vocabulary tile at a time (SPEC 5).

- `chunked_logps_and_entropy`: TRL's chunked log-prob kernel on the given tokens (log-prob with its gradient, entropy);
- `fused_policy_distillation`: one pass giving a distilled token's log-prob and entropy, the full-vocabulary reverse
  KL to the teacher (with its gradient) and the teacher's log-prob and entropy;
- `score_tokens`: the kernel calls of one batch, from the student's and the teacher's hidden states to `(B, T)`
  per-token scores, on the tokens a `TokenSelection` names: all the student's tokens in one fused pass.

Both score a token's log-prob and entropy with TRL's tiles and tile folds, so a token gets the same bits from either,
and from GRPOTrainer's old and reference log-probs (see `VOCAB_TILE`). Neither kernel materialises a `(N, V)` logit
matrix, nor waits on the device inside its loops. Under DeepSpeed ZeRO-3 each call gathers the partitioned heads
once for its forward and once for its backward (TRL's `maybe_gather_lm_head_ctx`), so every process must make the
same calls whatever its data: `score_tokens` calls each kernel a term needs even on an empty selection.

Shapes: `B` rollouts, `T` completion positions, `R` rollouts the teacher scored, `V` vocabulary, `H` hidden size,
`N` selected tokens.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor

# TRL's helpers (private to TRL, so imported through `_trl_compat`): its chunked log-prob kernel, that kernel's tile
# width and tile folds, fp32 gradient GEMMs from bf16/fp16 inputs, and ZeRO-3 gathering.
from ._trl_compat import (
    LOGPROB_BLOCK_SIZE,
    LOGPROB_TOKEN_CHUNK,
    LOGPROB_VOCAB_TILE,
    ChunkedLogProbFunction,
    logprob_backward_kernel,
    logprob_backward_tile,
    logprob_forward_kernel,
    maybe_gather_lm_head_ctx,
    use_triton,
)
from ._trl_compat import addmm_fp32 as _addmm_fp32
from ._trl_compat import compute_dtype as _compute_dtype
from .losses import TokenSelection

# One token, one log-prob. GRPOTrainer scores the old and reference log-probs with TRL's fused LM head: logits tiles
# `VOCAB_TILE` wide, projected in the compute dtype (rounded to bf16/fp16 under mixed precision, as a bf16 model's
# logits are), folded into an online log-sum-exp by TRL's tile fold. Every kernel here scores a token's log-prob and
# entropy that same way, with the same tile boundaries and the same fold, so a token gets the same bits whichever
# kernel scores it, in every dtype: an on-policy ratio is exactly 1, and the anchor's KL starts at exactly 0.
VOCAB_TILE = LOGPROB_VOCAB_TILE

# Memory of one token chunk of the fused pass, per logit of its `(token_chunk, VOCAB_TILE)` tiles, at its largest (a
# distilled chunk): the student's and the teacher's projections in the compute dtype, and three fp32 tiles, `log p`,
# `p` and `log q` in the backward (the forward's folds and KL sum share as many). Without a softcap, which adds fp32
# tiles, and on a GPU: on CPU, TRL's torch backward fold and fp32 GEMMs add their own upcasts
# (tests/test_head_kernels.py measures both).
COMPUTE_DTYPE_TILES, FP32_TILES = 2, 3
# The rule for the default token chunk: the largest power of two whose tiles take no more memory than the tile of
# TRL's own chunked log-prob kernel (GRPO's LM head), `LOGPROB_TOKEN_CHUNK x VOCAB_TILE` in bf16 (256 MiB). Then
# SDPG's head never needs more transient memory than GRPO's, at any vocabulary size. (docs/PERFORMANCE.md)
TILE_BUDGET_BYTES = LOGPROB_TOKEN_CHUNK * VOCAB_TILE * torch.bfloat16.itemsize


def chunk_transient_bytes(token_chunk: int, dtype: torch.dtype = torch.bfloat16, vocab_tile: int = VOCAB_TILE) -> int:
    """Transient bytes of one token chunk of the fused pass (its tiles), projected in `dtype`, without a softcap."""
    return token_chunk * vocab_tile * (COMPUTE_DTYPE_TILES * dtype.itemsize + FP32_TILES * 4)


def _default_token_chunk() -> int:
    chunk = 1
    while chunk_transient_bytes(2 * chunk) <= TILE_BUDGET_BYTES:
        chunk *= 2
    return chunk


# Tokens per block of vocabulary tiles, by the rule above (512 with TRL 1.16's tiles: 256 MiB in bf16).
TOKEN_CHUNK = _default_token_chunk()


def chunked_logps_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target (with grad) and entropy (without), in vocabulary tiles: TRL's fused-head kernel on
    exactly the given tokens (its fused head projects every position of the sequence on devices without Triton).

    Args:
        hidden: `(N, H)`; weight: `(V, H)`; bias: `(V,)` or None; targets: `(N,)` token ids.
    Returns: `(N,)` float32 log-probs and `(N,)` float32 entropies.
    """
    with maybe_gather_lm_head_ctx(weight, bias):
        outputs = ChunkedLogProbFunction.apply(
            hidden, weight, bias, targets, temperature, VOCAB_TILE, final_logit_softcapping, logit_scale, ("entropy",)
        )
    return outputs[0], outputs[1]


# Why not `trl.kernels.chunked_divergence.ChunkedDivergenceFunction`: it gives the same per-token KL, but next to
# TRL's log-prob kernel it projects the student a second time; one shared pass is ~30% less head work
# (`python -m bench.head_kernels`). Why not its fp32 logits either: the log-prob must be GRPO's (see `VOCAB_TILE`).
class _FusedPolicyDistillation(torch.autograd.Function):
    """One pass over vocabulary tiles giving, per token, everything SDPG needs from the LM head.

    Forward: the student's sampled-token log-prob and entropy (TRL's tile fold: GRPO's numbers, bit for bit), and for
    the first `T` rows, which have a teacher, the teacher's sampled-token log-prob and entropy (metrics) and the
    full-vocabulary reverse KL(p || SG[q]) (SPEC 2.2) of the same logits. Backward recomputes the tiles and applies
    `dL/dz = g_logp * (onehot(y) - p) + g_kl * p * (log p - log q - KL) - g_H * p * (log p + H)` to the student only
    (the last term is the entropy's gradient, for GRPO's entropy bonus); rows without a KL gradient take TRL's
    backward fold. With `teacher_hidden` None or `(0, H)`, no row has a teacher: the KL and teacher outputs are 0.

    Tokens are processed `token_chunk` at a time inside one call, so that the heads are gathered once per forward and
    once per backward (ZeRO-3) however many tokens this process has, none included, and the head's gradient is one
    fp32 `(V, H)` buffer per call, none without tokens. No step of either loop waits on the device (no host sync).
    Shapes: student `(N, H)`, teacher `(T, H)`, weights `(V, H)`, biases `(V,)` or None, labels `(N,)` -> five `(N,)`
    fp32 tensors, 0 past row `T` for the teacher's three.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden,
        teacher_hidden,
        weight,
        bias,
        teacher_weight,
        teacher_bias,
        labels,
        transform,
        token_chunk,
        vocab_chunk,
    ):
        dtype = _compute_dtype(student_hidden)
        n = student_hidden.shape[0]
        n_teacher = 0 if teacher_hidden is None else teacher_hidden.shape[0]
        f32 = {"device": student_hidden.device, "dtype": torch.float32}
        logps, entropy, kl, teacher_logps, teacher_entropy = (torch.zeros(n, **f32) for _ in range(5))
        s_lse, t_lse = torch.zeros(n, **f32), torch.zeros(n_teacher, **f32)
        with _gather_heads(weight, bias, teacher_weight, teacher_bias):
            buffers = _TileBuffers(min(n, token_chunk), min(weight.shape[0], vocab_chunk), dtype, weight.device)
            for rows in _row_chunks(n, n_teacher, token_chunk):
                h_t = teacher_hidden[rows].to(dtype) if rows.stop <= n_teacher else None
                out = _fused_forward_chunk(
                    student_hidden[rows].to(dtype),
                    h_t,
                    weight,
                    bias,
                    teacher_weight,
                    teacher_bias,
                    labels[rows],
                    transform,
                    vocab_chunk,
                    dtype,
                    buffers,
                )
                logps[rows], entropy[rows], s_lse[rows] = out[:3]
                if h_t is not None:
                    kl[rows], teacher_logps[rows], teacher_entropy[rows], t_lse[rows] = out[3:]
        ctx.save_for_backward(
            student_hidden,
            teacher_hidden,
            weight,
            bias,
            teacher_weight,
            teacher_bias,
            labels,
            s_lse,
            t_lse,
            kl,
            entropy,
        )
        ctx.transform, ctx.token_chunk, ctx.vocab_chunk, ctx.dtype = transform, token_chunk, vocab_chunk, dtype
        ctx.mark_non_differentiable(teacher_logps, teacher_entropy)
        ctx.set_materialize_grads(False)  # an output the loss does not use gets None: its term is skipped
        return logps, entropy, kl, teacher_logps, teacher_entropy

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, grad_kl, _grad_teacher_logps, _grad_teacher_entropy):
        (
            student_hidden,
            teacher_hidden,
            weight,
            bias,
            teacher_weight,
            teacher_bias,
            labels,
            s_lse,
            t_lse,
            kl,
            entropy,
        ) = ctx.saved_tensors
        dtype, n = ctx.dtype, student_hidden.shape[0]
        n_teacher = 0 if teacher_hidden is None else teacher_hidden.shape[0]
        grads = _RowGrads.of(grad_logps, grad_entropy, grad_kl)
        need_weight = ctx.needs_input_grad[2] and n > 0  # no tokens: no gradient buffer at all
        need_bias = bias is not None and ctx.needs_input_grad[3] and n > 0
        grad_hidden = torch.zeros(student_hidden.shape, device=student_hidden.device, dtype=torch.float32)
        # The head's shape is read inside the gather: under ZeRO-3 a partitioned parameter is empty outside it.
        with _gather_heads(weight, bias, teacher_weight, teacher_bias):
            f32 = {"device": weight.device, "dtype": torch.float32}  # gradients accumulate in fp32, as in TRL's
            grad_weight = torch.zeros(weight.shape, **f32) if need_weight else None
            grad_bias = torch.zeros(weight.shape[0], **f32) if need_bias else None
            vocab = weight.shape[0]
            buffers = _TileBuffers(min(n, ctx.token_chunk), min(vocab, ctx.vocab_chunk), dtype, weight.device)
            for rows in _row_chunks(n, n_teacher, ctx.token_chunk):
                with_kl = grads.kl is not None and rows.stop <= n_teacher
                if grads.logps is None and grads.entropy is None and not with_kl:
                    continue  # nothing this chunk's rows give has a gradient
                h_s = student_hidden[rows].to(dtype)
                h_t = teacher_hidden[rows].to(dtype) if with_kl else None
                for v_start in range(0, vocab, ctx.vocab_chunk):
                    v_end = min(v_start + ctx.vocab_chunk, vocab)
                    tile = _project(buffers.student, h_s, weight, bias, v_start, v_end, dtype)
                    if h_t is None:  # TRL's backward fold: the tile becomes the logits' gradient, in place
                        _fold_backward(
                            tile, labels[rows], s_lse[rows], entropy[rows], grads, rows, v_start, ctx.transform
                        )
                        grad_tile = grad_bias_rows = tile
                    else:
                        t = _project(buffers.teacher, h_t, teacher_weight, teacher_bias, v_start, v_end, dtype)
                        grad_bias_rows = _distilled_logit_grad(
                            tile,
                            t,
                            labels[rows],
                            s_lse[rows],
                            t_lse[rows],
                            kl[rows],
                            entropy[rows],
                            grads,
                            rows,
                            v_start,
                            ctx.transform,
                        )
                        grad_tile = grad_bias_rows.to(dtype)
                    _addmm_fp32(grad_hidden[rows], grad_tile, weight[v_start:v_end].to(dtype))
                    if grad_weight is not None:
                        _addmm_fp32(grad_weight[v_start:v_end], grad_tile.t(), h_s)
                    if grad_bias is not None:
                        grad_bias[v_start:v_end] += grad_bias_rows.sum(0, dtype=torch.float32)
                    del grad_tile, grad_bias_rows  # freed before the next tile's: one gradient tile at a time
            grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
            grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden.to(student_hidden.dtype), None, grad_weight, grad_bias, None, None, None, None, None, None


class _RowGrads(NamedTuple):
    """The upstream gradients of the student's outputs, `(N,)` fp32 each, None for an output the loss does not use."""

    logps: torch.Tensor | None
    entropy: torch.Tensor | None
    kl: torch.Tensor | None

    @classmethod
    def of(cls, *grads: torch.Tensor | None) -> _RowGrads:
        return cls(*(None if g is None else g.float().contiguous() for g in grads))


class _TileBuffers:
    """One logits tile per view in the compute dtype, `(rows, vocab_chunk)`, reused by every tile of a call (the
    teacher's allocated on first use), as `ChunkedLogProbFunction` reuses its one; and the fp32 tiles of the forward's
    folds and KL sum, also reused (on CPU a fresh tile per operation is an `mmap` and a page fault per 4 KiB)."""

    def __init__(self, rows: int, width: int, dtype: torch.dtype, device: torch.device):
        self.shape, self.dtype, self.device = (rows, width), dtype, device
        self.student = torch.empty(self.shape, dtype=dtype, device=device)
        self._teacher = None
        self._fp32: list[torch.Tensor] = []

    @property
    def teacher(self) -> torch.Tensor:
        if self._teacher is None:
            self._teacher = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return self._teacher

    def fp32(self, i: int, like: torch.Tensor) -> torch.Tensor:
        """The `i`-th fp32 scratch tile (allocated on first use), as a contiguous tile of `like`'s shape: laid out as
        the fresh tile an out-of-place operation makes, so a sum over it adds in the same order."""
        while len(self._fp32) <= i:
            self._fp32.append(torch.empty(self.shape[0] * self.shape[1], dtype=torch.float32, device=self.device))
        return self._fp32[i][: like.numel()].view(like.shape)


def _row_chunks(n: int, n_teacher: int, token_chunk: int):
    """Slices of at most `token_chunk` rows, the rows with a teacher (`[0, n_teacher)`) first, none straddling."""
    for first, last in ((0, n_teacher), (n_teacher, n)):
        for start in range(first, last, token_chunk):
            yield slice(start, min(start + token_chunk, last))


def _project(buffer, hidden, weight, bias, start, end, dtype):
    """Logits of vocabulary rows `start:end` in the compute dtype, into `buffer`: the projection of TRL's
    `ChunkedLogProbFunction` (the body of its loop, which TRL does not expose as a function)."""
    tile = buffer[: hidden.shape[0], : end - start]
    torch.mm(hidden, weight[start:end].to(dtype).t(), out=tile)
    if bias is not None:
        tile.add_(bias[start:end].to(dtype))
    return tile


class _Stats(NamedTuple):
    """TRL's online log-sum-exp statistics of one view, `(n,)` fp32 each."""

    max: torch.Tensor
    sum_exp: torch.Tensor
    x_sum_exp: torch.Tensor
    label_logit: torch.Tensor

    @classmethod
    def new(cls, n: int, device: torch.device) -> _Stats:
        f32 = {"device": device, "dtype": torch.float32}
        return cls(torch.full((n,), -math.inf, **f32), *(torch.zeros(n, **f32) for _ in range(3)))

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-prob of the label, entropy, log-normaliser), in `ChunkedLogProbFunction.forward`'s arithmetic."""
        log_z = self.max + torch.log(self.sum_exp)
        return self.label_logit - log_z, log_z - self.x_sum_exp / self.sum_exp, log_z


def _kernel_args(transform) -> dict:
    """The transform's arguments to TRL's folds, as `ChunkedLogProbFunction` passes them."""
    scale, softcap, inv_t = transform
    return {"logit_scale": scale, "softcap": softcap or 1.0, "inv_t": inv_t, "HAS_SOFTCAP": softcap is not None}


def _fold_forward(tile, labels, stats: _Stats, start, transform, buffers: _TileBuffers):
    """Fold one compute-dtype tile into `stats` with TRL's forward fold: its Triton kernel on CUDA/XPU; elsewhere
    the operations of its torch fold (`logprob_forward_tile`, with entropy), on the same values in the same order,
    so the same bits, but into two reused fp32 tiles instead of five fresh ones per tile."""
    n, width = tile.shape
    if use_triton(tile.device):
        unused = torch.zeros(n, device=tile.device, dtype=torch.float32)  # statistics of outputs not requested
        logprob_forward_kernel[(n,)](
            tile,
            tile.stride(0),
            labels,
            stats.max,
            stats.sum_exp,
            stats.x_sum_exp,
            unused,
            unused,
            unused,
            stats.label_logit,
            start,
            width,
            HAS_ENTROPY=True,
            HAS_LOG_SUM_SQ_PROBS=False,
            HAS_MEAN_LOGITS=False,
            HAS_IS_TOP1=False,
            BLOCK_SIZE=LOGPROB_BLOCK_SIZE,
            **_kernel_args(transform),
        )
        return
    z = _logits_into(tile, transform, buffers, 0)
    new_max = torch.maximum(stats.max, z.amax(-1))
    rescale = torch.exp(stats.max - new_max)
    e = torch.sub(z, new_max.unsqueeze(-1), out=buffers.fp32(int(z is not tile), tile)).exp_()
    stats.sum_exp.mul_(rescale).add_(e.sum(-1))
    stats.x_sum_exp.mul_(rescale).add_(e.mul_(z).sum(-1))
    stats.max.copy_(new_max)
    local = labels - start
    in_tile = (local >= 0) & (local < width)
    label_z = z.gather(-1, local.clamp(0, width - 1).unsqueeze(-1)).squeeze(-1)
    stats.label_logit.copy_(torch.where(in_tile, label_z, stats.label_logit))


def _fold_backward(tile, labels, log_z, entropy, grads: _RowGrads, rows, start, transform):
    """TRL's backward fold: `tile` (recomputed logits) becomes the gradient of the rows' log-probs and entropies with
    respect to the projection, in place, in the compute dtype."""
    n, width = tile.shape
    if use_triton(tile.device):
        fold = logprob_backward_kernel[(n, -(-width // LOGPROB_BLOCK_SIZE))]
    else:
        fold = logprob_backward_tile
    g_logps = log_z if grads.logps is None else grads.logps[rows]  # the fold reads a tensor it does not use
    g_entropy = log_z if grads.entropy is None else grads.entropy[rows]
    fold(
        tile,
        tile.stride(0),
        labels,
        log_z,
        entropy,
        g_logps,
        g_entropy,
        start,
        width,
        HAS_LOGPROB_GRAD=grads.logps is not None,
        HAS_ENTROPY_GRAD=grads.entropy is not None,
        BLOCK_SIZE=LOGPROB_BLOCK_SIZE,
        **_kernel_args(transform),
    )


def _fused_forward_chunk(
    h_s, h_t, weight, bias, teacher_weight, teacher_bias, labels, transform, vocab_chunk, dtype, buffers
):
    """The forward of `_FusedPolicyDistillation` for one chunk of tokens. The student's (and the teacher's) tiles go
    through TRL's fold; the KL's sum `sum_v exp(s_v - m) (s_v - t_v)` follows the student's running max `m`,
    rescaled whenever a tile raises it. Returns the student's log-prob, entropy and log-normaliser, then, with a
    teacher (`h_t` not None), the KL and the teacher's log-prob, entropy and log-normaliser."""
    n, vocab = h_s.shape[0], weight.shape[0]
    student = _Stats.new(n, h_s.device)
    teacher = None if h_t is None else _Stats.new(n, h_s.device)
    s_gap = torch.zeros(n, device=h_s.device, dtype=torch.float32)
    for start in range(0, vocab, vocab_chunk):
        end = min(start + vocab_chunk, vocab)
        s = _project(buffers.student, h_s, weight, bias, start, end, dtype)
        if teacher is None:
            _fold_forward(s, labels, student, start, transform, buffers)
            continue
        s_max = student.max.clone()
        _fold_forward(s, labels, student, start, transform, buffers)
        t = _project(buffers.teacher, h_t, teacher_weight, teacher_bias, start, end, dtype)
        _fold_forward(t, labels, teacher, start, transform, buffers)
        s_gap = s_gap * torch.exp(s_max - student.max) + _gap_sum(s, t, student.max, transform, buffers)
    logps, entropy, s_lse = student.finish()
    if teacher is None:
        return logps, entropy, s_lse
    teacher_logps, teacher_entropy, t_lse = teacher.finish()
    kl = s_gap / student.sum_exp - s_lse + t_lse
    return logps, entropy, s_lse, kl, teacher_logps, teacher_entropy, t_lse


def _gap_sum(s, t, s_max, transform, buffers: _TileBuffers):
    """`sum_v exp(s_v - s_max) (s_v - t_v)` per row of one tile of both views, from their compute-dtype logits, in the
    reused fp32 tiles (and the teacher's tile, which is not read again)."""
    z_s = _logits_into(s, transform, buffers, 0)
    z_t = _logits_into(t, transform, buffers, int(z_s is not s))
    e_s = torch.sub(z_s, s_max.unsqueeze(1), out=buffers.fp32(int(z_s is not s) + int(z_t is not t), s)).exp_()
    return torch.sub(z_s, z_t, out=z_t).mul_(e_s).sum(-1)


def _distilled_logit_grad(s, t, labels, s_lse, t_lse, kl, entropy, grads: _RowGrads, rows, start, transform):
    """The gradient of a distilled chunk's terms with respect to the raw projection of one tile, fp32 `(n, width)`,
    from the recomputed compute-dtype tiles of both views."""
    z_s, dz_draw = _logits(s, transform)
    # Each step in place in a tile that is not read again (see `_fused_forward_chunk`).
    log_p = z_s.sub_(s_lse.unsqueeze(1))
    p = log_p.exp()
    g_logps = torch.zeros_like(s_lse) if grads.logps is None else grads.logps[rows]
    scale = -g_logps.unsqueeze(1)  # the softmax part of each term's gradient is p * scale
    z_t, _ = _logits(t, transform)
    log_q = z_t.sub_(t_lse.unsqueeze(1))
    # grad_kl * (log_p - log_q - kl) + scale, in log_q's tile
    gap = torch.sub(log_p, log_q, out=log_q).sub_(kl.unsqueeze(1))
    scale = gap.mul_(grads.kl[rows].unsqueeze(1)).add_(scale)
    if grads.entropy is not None:  # scale - grad_entropy * (log_p + entropy), in log_p's tile
        term = log_p.add_(entropy.unsqueeze(1)).mul_(grads.entropy[rows].unsqueeze(1))
        scale = torch.sub(scale, term, out=term)
    grad_z = p.mul_(scale)
    # + g_logp at each row's label, where it falls in this tile: a gather and a `where`, no host sync
    local = labels - start
    in_tile = (local >= 0) & (local < grad_z.shape[1])
    grad_z.scatter_add_(1, local.clamp(0, grad_z.shape[1] - 1).unsqueeze(1), g_logps.where(in_tile, 0.0).unsqueeze(1))
    return _times(grad_z, dz_draw)


def _logits(tile, transform):
    """fp32 logits of a compute-dtype tile after scale, softcap and temperature (TRL's `_torch_transform`), and their
    derivative with respect to the raw projection (a scalar, or a tile when softcapping)."""
    scale, softcap, inv_temperature = transform
    z = _times(tile.float(), scale)
    if softcap is None:
        return _times(z, inv_temperature), scale * inv_temperature
    capped = torch.tanh(z / softcap)
    return softcap * capped * inv_temperature, (1 - capped.square()) * scale * inv_temperature


def _times(tile, factor):
    """`tile * factor`, without a pass over the tile when `factor` is the number 1 (the usual scale and temperature):
    multiplying by 1 changes no value."""
    return tile if isinstance(factor, int | float) and factor == 1 else tile * factor


def _logits_into(tile, transform, buffers: _TileBuffers, i: int):
    """`_logits(tile, transform)[0]` (TRL's `_torch_transform` of the tile in fp32), computed in the `i`-th fp32
    scratch tile; the compute-dtype tile itself when it is fp32 and the transform changes nothing."""
    scale, softcap, inv_temperature = transform
    if tile.dtype == torch.float32 and softcap is None and scale == 1 and inv_temperature == 1:
        return tile
    z = buffers.fp32(i, tile).copy_(tile)  # `tile.float()`, exact
    if scale != 1:
        z.mul_(scale)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z if inv_temperature == 1 else z.mul_(inv_temperature)


@contextmanager
def _gather_heads(weight, bias, teacher_weight, teacher_bias):
    """ZeRO-3 gathering of the student's head, and of the teacher's when it is another model's."""
    with maybe_gather_lm_head_ctx(weight, bias):
        if teacher_weight is None or teacher_weight is weight:
            yield
        else:
            with maybe_gather_lm_head_ctx(teacher_weight, teacher_bias):
                yield


def fused_policy_distillation(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = TOKEN_CHUNK,
    vocab_chunk_size: int = VOCAB_TILE,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC 2.1, 2.2 and 5 for the distilled tokens in one LM-head pass: student log-prob of the sampled token
    and entropy, reverse KL(p || SG[q]), and the teacher's log-prob of the sampled token and entropy (no grad).

    Sharing the student's vocabulary projection between the outcome term and the KL is the point: the LM head runs
    twice per view (forward, recompute in backward) instead of TRL's fused head plus a separate divergence pass.
    At the default `vocab_chunk_size` (TRL's tile width) the log-probs and entropies are `chunked_logps_and_entropy`'s
    bit for bit, in every dtype (see `VOCAB_TILE`); the KL is that of the same logits. Transient memory is
    `chunk_transient_bytes(chunk_size)`, whatever the vocabulary size.

    Args:
        student_hidden: `(N, H)` student final hidden states, with grad. teacher_hidden: `(N, H)`, detached here;
            None: no teacher (the KL and the teacher's outputs are 0), for the entropy's gradient alone.
        weight: `(V, H)` student LM-head weight. bias: `(V,)` or None. labels: `(N,)` sampled tokens.
        teacher_weight, teacher_bias: the teacher's head when it is another model (frozen or EMA teacher); default
            the student's (the live teacher shares the weights).
        chunk_size: tokens per block of vocabulary tiles. vocab_chunk_size: the vocabulary tile width.
    Returns: `(logps, entropy, kl, teacher_logps, teacher_entropy)`, each `(N,)` fp32; `logps`, `entropy` and `kl`
        carry gradients (the student's only).
    """
    if teacher_weight is None:
        teacher_weight, teacher_bias = weight, bias
    transform = (logit_scale, final_logit_softcapping, 1.0 / temperature)
    return _FusedPolicyDistillation.apply(
        student_hidden,
        None if teacher_hidden is None else teacher_hidden.detach(),
        weight,
        bias,
        teacher_weight,
        teacher_bias,  # no gradient flows to it: backward returns None for the teacher's head
        labels,
        transform,
        chunk_size,
        vocab_chunk_size,
    )


def lm_head_parameters(causal_lm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `(V, H)` weight and `(V,)` bias (or None) of a causal LM's output layer, whole: FSDP2 shards them as
    DTensors, and the kernels need the whole head, as TRL's fused head does (`full_tensor` gathers it, and its
    backward scatters the gradient back to the shards). ZeRO-3 parameters are gathered by the kernels themselves."""
    head = causal_lm.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if isinstance(weight, DTensor):
        weight = weight.full_tensor()
        bias = None if bias is None else bias.full_tensor()
    return weight, bias


class HeadScores(NamedTuple):
    """What the LM head gives one batch, as `(B, T)` fp32 tensors, 0 where a token was not scored.

    Attributes:
        logps: the student's log-prob of each sampled token (with grad). entropy: the student's entropy (no grad).
        distill_kl: the full-vocabulary reverse KL to the teacher on the distilled tokens (with grad).
        teacher_logps, teacher_entropy: the teacher's view of the tokens it scored (no grad).
    """

    logps: torch.Tensor
    entropy: torch.Tensor
    distill_kl: torch.Tensor
    teacher_logps: torch.Tensor
    teacher_entropy: torch.Tensor


class LMHead(NamedTuple):
    """An LM head's parameters (`(V, H)` weight, `(V,)` bias or None) and the output transform of its logits."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    temperature: float = 1.0
    logit_scale: float = 1.0
    final_logit_softcapping: float | None = None


def score_tokens(
    hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    completion_ids: torch.Tensor,
    selection: TokenSelection,
    head: LMHead,
    teacher_head: LMHead,
    *,
    distill: bool,
    rlsd: bool,
    entropy_grad: bool = False,
    chunk_size: int = TOKEN_CHUNK,
) -> HeadScores:
    """The LM head on the tokens `selection` names (SPEC 2, 3, 5), in two kernel calls at most:

    - the student's tokens, `selection.distilled` then `selection.plain` (valid, not distilled), in one fused pass:
      the student's log-prob and entropy of each, and for the distilled ones the KL and the teacher's view, from one
      projection of each view; one call, so one head gradient per micro-batch;
    - `selection.teacher_only` (RLSD's rows that are not distilled): the teacher's log-prob and entropy, no grad,
      from TRL's log-prob kernel.

    Every log-prob and entropy is TRL's (`VOCAB_TILE`), bit for bit. The calls a term needs (`distill`, `rlsd`) are
    made even on empty selections, so that every process makes the same calls (ZeRO-3 gathers the heads in each).

    Args:
        hidden: `(B, T, H)` student hidden states predicting each completion token. teacher_hidden: `(R, T, H)`
            the teacher's, for the rows `selection.teacher_index` points to (`R` may be 0).
        completion_ids: `(B, T)`. head, teacher_head: the student's and the teacher's LM head (the same for a live
            teacher). entropy_grad: the student's entropy carries its gradient (GRPO's entropy bonus); otherwise it
            is detached.
    Returns: `HeadScores`.
    """
    transform = (head.logit_scale, head.final_logit_softcapping, 1.0 / head.temperature)
    # Zeros attached to the graph, so a batch with no valid token still backpropagates (as TRL's fused head does).
    logps = hidden[..., 0].float() * 0.0
    entropy, kl, teacher_logps, teacher_entropy = (torch.zeros_like(logps) for _ in range(4))

    distilled = selection.distilled.nonzero(as_tuple=True) if distill else (completion_ids.new_zeros(0),) * 2
    plain = selection.plain.nonzero(as_tuple=True)
    where = tuple(torch.cat(index) for index in zip(distilled, plain))  # the distilled tokens first
    outputs = _FusedPolicyDistillation.apply(
        hidden[where],
        teacher_hidden[selection.teacher_index[distilled[0]], distilled[1]] if distill else None,
        head.weight,
        head.bias,
        teacher_head.weight if distill else None,
        teacher_head.bias if distill else None,
        completion_ids[where],
        transform,
        chunk_size,
        VOCAB_TILE,
    )
    s_logps, s_entropy, s_kl, t_logps, t_entropy = outputs
    logps = logps.index_put(where, s_logps)
    entropy = entropy.index_put(where, s_entropy if entropy_grad else s_entropy.detach())
    if distill:  # 0 past the distilled tokens
        kl = kl.index_put(where, s_kl)
        teacher_logps = teacher_logps.index_put(where, t_logps)
        teacher_entropy = teacher_entropy.index_put(where, t_entropy)
    if rlsd:  # RLSD needs the teacher's sampled-token log-prob, not its KL
        where = selection.teacher_only.nonzero(as_tuple=True)
        with torch.no_grad():
            t_logps, t_entropy = chunked_logps_and_entropy(
                teacher_hidden[selection.teacher_index[where[0]], where[1]],
                teacher_head.weight,
                teacher_head.bias,
                completion_ids[where],
                temperature=head.temperature,
                logit_scale=head.logit_scale,
                final_logit_softcapping=head.final_logit_softcapping,
            )
        teacher_logps = teacher_logps.index_put(where, t_logps)
        teacher_entropy = teacher_entropy.index_put(where, t_entropy)
    return HeadScores(logps, entropy, kl, teacher_logps, teacher_entropy)
