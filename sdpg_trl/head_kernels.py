"""The LM-head kernels: what SDPG needs from the vocabulary projection, one vocabulary tile at a time (SPEC 5).

- `chunked_logps_and_entropy`: TRL's chunked log-prob kernel on the given tokens (log-prob with its gradient, entropy);
- `fused_policy_distillation`: one pass giving a distilled token's log-prob and entropy, the full-vocabulary reverse
  KL to the teacher (with its gradient) and the teacher's log-prob and entropy;
- `score_tokens`: the kernel calls of one batch, from the student's and the teacher's hidden states to `(B, T)`
  per-token scores, on the tokens a `TokenSelection` names.

Neither kernel materialises a `(N, V)` logit matrix. Under DeepSpeed ZeRO-3 each call gathers the partitioned heads
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

# TRL's helpers (private to TRL, so imported through `_trl_compat`): fp32 projections and gradient GEMMs from
# bf16/fp16 inputs, and ZeRO-3 gathering.
from ._trl_compat import ChunkedLogProbFunction, maybe_gather_lm_head_ctx
from ._trl_compat import addmm_fp32 as _addmm_fp32
from ._trl_compat import compute_dtype as _compute_dtype
from ._trl_compat import project_tile as _project
from .losses import TokenSelection

# Vocabulary tile width of TRL's chunked log-prob kernel (the value TRL's own fused LM head uses).
_VOCAB_TILE = 32768


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
            hidden, weight, bias, targets, temperature, _VOCAB_TILE, final_logit_softcapping, logit_scale, ("entropy",)
        )
    return outputs[0], outputs[1]


# Why not `trl.kernels.chunked_divergence.ChunkedDivergenceFunction`: it gives the same per-token KL, but next to
# TRL's log-prob kernel it projects the student a second time; one shared pass is ~30% less head work
# (`python -m bench.head_kernels`). Its tile helpers are reused here.
class _FusedPolicyDistillation(torch.autograd.Function):
    """One pass over vocabulary tiles giving, per distilled token, everything SDPG needs from the LM head.

    Forward: the student's sampled-token log-prob and entropy (what TRL's fused head gives GRPO), the teacher's
    sampled-token log-prob and entropy (metrics), and the full-vocabulary reverse KL(p || SG[q]) (SPEC 2.2), from
    online softmax statistics. Backward recomputes both tiles once and applies
    `dL/dz = g_logp * (onehot(y) - p) + g_kl * p * (log p - log q - KL) - g_H * p * (log p + H)` to the student only
    (the last term is the entropy's gradient, for GRPO's entropy bonus). Without a teacher (`teacher_hidden` None)
    it is the student's pass alone: log-prob and entropy, both with gradients, and zeros for the rest.

    Tokens are processed `token_chunk` at a time inside one call, so that the heads are gathered once per forward and
    once per backward (ZeRO-3) however many tokens this process has, none included.
    Shapes: hiddens `(N, H)`, weights `(V, H)`, biases `(V,)` or None, labels `(N,)` -> five `(N,)` fp32 tensors.
    """

    @staticmethod
    def forward(ctx, student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, labels, transform,
                token_chunk, vocab_chunk):  # fmt: skip
        dtype = _compute_dtype(student_hidden)
        n = student_hidden.shape[0]
        f32 = {"device": student_hidden.device, "dtype": torch.float32}
        logps, entropy, kl, teacher_logps, teacher_entropy = (torch.zeros(n, **f32) for _ in range(5))
        s_lse, t_lse = torch.zeros(n, **f32), torch.zeros(n, **f32)
        with _gather_heads(weight, bias, teacher_weight, teacher_bias):
            for start in range(0, n, token_chunk):
                rows = slice(start, start + token_chunk)
                h_t = None if teacher_hidden is None else teacher_hidden[rows].to(dtype)
                out = _fused_forward_chunk(student_hidden[rows].to(dtype), h_t, weight, bias, teacher_weight,
                                           teacher_bias, labels[rows], transform, vocab_chunk, dtype)  # fmt: skip
                logps[rows], entropy[rows], kl[rows], teacher_logps[rows], teacher_entropy[rows] = out[:5]
                s_lse[rows], t_lse[rows] = out[5:]
        ctx.save_for_backward(student_hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, labels,
                              s_lse, t_lse, kl, entropy)  # fmt: skip
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
        dtype = ctx.dtype
        grad_logps = torch.zeros_like(kl) if grad_logps is None else grad_logps.float()
        with_kl, with_entropy = grad_kl is not None and teacher_hidden is not None, grad_entropy is not None
        need_weight = ctx.needs_input_grad[2]
        need_bias = bias is not None and ctx.needs_input_grad[3]
        grad_hidden = torch.zeros(student_hidden.shape, device=student_hidden.device, dtype=torch.float32)
        # The head's shape is read inside the gather: under ZeRO-3 a partitioned parameter is empty outside it.
        with _gather_heads(weight, bias, teacher_weight, teacher_bias):
            f32 = {
                "device": weight.device,
                "dtype": torch.float32,
            }  # gradients accumulate in fp32, as in TRL's kernels
            grad_weight = torch.zeros(weight.shape, **f32) if need_weight else None
            grad_bias = torch.zeros(weight.shape[0], **f32) if need_bias else None
            for start in range(0, student_hidden.shape[0], ctx.token_chunk):
                rows = slice(start, start + ctx.token_chunk)
                h_s = student_hidden[rows].to(dtype)
                for v_start in range(0, weight.shape[0], ctx.vocab_chunk):
                    v_end = min(v_start + ctx.vocab_chunk, weight.shape[0])
                    s, dz_draw = _logit_tile(h_s, weight, bias, v_start, v_end, ctx.transform, dtype)
                    # Each step in place in a tile that is not read again (see `_fused_forward_chunk`).
                    log_p = s.sub_(s_lse[rows].unsqueeze(1))
                    p = log_p.exp()
                    g_logps = grad_logps[rows]
                    scale = -g_logps.unsqueeze(1)  # the softmax part of each term's gradient is p * scale
                    if with_kl:
                        h_t = teacher_hidden[rows].to(dtype)
                        t, _ = _logit_tile(h_t, teacher_weight, teacher_bias, v_start, v_end, ctx.transform, dtype)
                        log_q = t.sub_(t_lse[rows].unsqueeze(1))
                        # grad_kl * (log_p - log_q - kl) + scale, in log_q's tile
                        gap = torch.sub(log_p, log_q, out=log_q).sub_(kl[rows].unsqueeze(1))
                        scale = gap.mul_(grad_kl[rows].float().unsqueeze(1)).add_(scale)
                    if with_entropy:  # scale - grad_entropy * (log_p + entropy), in log_p's tile
                        term = log_p.add_(entropy[rows].unsqueeze(1)).mul_(grad_entropy[rows].float().unsqueeze(1))
                        scale = torch.sub(scale, term, out=term)
                    grad_z = p.mul_(scale)
                    hit, cols = _labels_in_tile(labels[rows], v_start, v_end)
                    grad_z[hit, cols] += g_logps[hit]
                    grad_raw = _times(grad_z, dz_draw)
                    grad_tile = grad_raw.to(dtype)
                    _addmm_fp32(grad_hidden[rows], grad_tile, weight[v_start:v_end].to(dtype))
                    if need_weight:
                        _addmm_fp32(grad_weight[v_start:v_end], grad_tile.t(), h_s)
                    if need_bias:
                        grad_bias[v_start:v_end] += grad_raw.sum(0)
            grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
            grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden.to(student_hidden.dtype), None, grad_weight, grad_bias, None, None, None, None, None, None


def _fused_forward_chunk(h_s, h_t, weight, bias, teacher_weight, teacher_bias, labels, transform, vocab_chunk, dtype):
    """The forward of `_FusedPolicyDistillation` for one chunk of tokens: online softmax statistics of both views,
    rescaled whenever a tile raises the running max. Returns the five outputs and both log-normalisers; without a
    teacher (`h_t` None) only the student's statistics are computed, and the KL and the teacher's outputs are 0."""
    n, vocab = h_s.shape[0], weight.shape[0]
    f32 = {"device": h_s.device, "dtype": torch.float32}
    s_max, t_max = torch.full((n,), -math.inf, **f32), torch.full((n,), -math.inf, **f32)
    s_sum, s_x_sum, s_gap, t_sum, t_x_sum, s_label, t_label = (torch.zeros(n, **f32) for _ in range(7))
    for start in range(0, vocab, vocab_chunk):
        end = min(start + vocab_chunk, vocab)
        s, _ = _logit_tile(h_s, weight, bias, start, end, transform, dtype)
        rows, cols = _labels_in_tile(labels, start, end)
        s_label[rows] = s[rows, cols]
        new_s_max = torch.maximum(s_max, s.amax(-1))
        s_rescale = torch.exp(s_max - new_s_max)
        # In place wherever a tile is not read again: the values of out-of-place arithmetic, without allocating (and
        # on CPU page-faulting) a fresh `(N, vocab_chunk)` tile per operation.
        e_s = (s - new_s_max.unsqueeze(1)).exp_()
        s_sum = s_sum * s_rescale + e_s.sum(-1)
        if h_t is not None:  # the teacher's statistics and the KL's sum, which reads `e_s` before it is reused
            t, _ = _logit_tile(h_t, teacher_weight, teacher_bias, start, end, transform, dtype)
            t_label[rows] = t[rows, cols]
            new_t_max = torch.maximum(t_max, t.amax(-1))
            t_rescale = torch.exp(t_max - new_t_max)
            e_t = (t - new_t_max.unsqueeze(1)).exp_()
            t_sum = t_sum * t_rescale + e_t.sum(-1)
            s_gap = s_gap * s_rescale + (s - t).mul_(e_s).sum(-1)
            t_x_sum = t_x_sum * t_rescale + e_t.mul_(t).sum(-1)
            t_max = new_t_max
        s_x_sum = s_x_sum * s_rescale + e_s.mul_(s).sum(-1)
        s_max = new_s_max
    s_lse = s_max + s_sum.log()
    logps, entropy = s_label - s_lse, s_lse - s_x_sum / s_sum
    if h_t is None:
        zeros = torch.zeros_like(s_lse)  # copied into the caller's buffers, so one tensor serves every output
        return logps, entropy, zeros, zeros, zeros, s_lse, zeros
    t_lse = t_max + t_sum.log()
    kl = s_gap / s_sum - s_lse + t_lse
    return logps, entropy, kl, t_label - t_lse, t_lse - t_x_sum / t_sum, s_lse, t_lse


@contextmanager
def _gather_heads(weight, bias, teacher_weight, teacher_bias):
    """ZeRO-3 gathering of the student's head, and of the teacher's when it is another model's."""
    with maybe_gather_lm_head_ctx(weight, bias):
        if teacher_weight is weight:
            yield
        else:
            with maybe_gather_lm_head_ctx(teacher_weight, teacher_bias):
                yield


def _logit_tile(hidden, weight, bias, start, end, transform, dtype):
    """fp32 logits `(N, end - start)` of one vocabulary tile after scale, softcap and temperature, and their
    derivative with respect to the raw projection (a scalar, or a tile when softcapping)."""
    scale, softcap, inv_temperature = transform
    z = torch.empty((hidden.shape[0], end - start), device=hidden.device, dtype=torch.float32)
    _project(z, hidden, weight, bias, start, end, dtype)  # TRL's: fp32 output even from bf16 inputs
    z = _times(z, scale)
    if softcap is None:
        return _times(z, inv_temperature), scale * inv_temperature
    capped = torch.tanh(z / softcap)
    return softcap * capped * inv_temperature, (1 - capped.square()) * scale * inv_temperature


def _times(tile, factor):
    """`tile * factor`, without a pass over the tile when `factor` is the number 1 (the usual scale and temperature):
    multiplying by 1 changes no value."""
    return tile if isinstance(factor, int | float) and factor == 1 else tile * factor


def _labels_in_tile(labels, start, end):
    """(rows, columns within the tile) of the labels that fall in vocabulary tile [start, end)."""
    rows = ((labels >= start) & (labels < end)).nonzero().squeeze(1)
    return rows, labels[rows] - start


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
    chunk_size: int = 1024,
    vocab_chunk_size: int = 8192,
    logit_scale: float = 1.0,
    final_logit_softcapping: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SPEC 2.1, 2.2 and 5 for the distilled tokens in one LM-head pass: student log-prob of the sampled token
    and entropy, reverse KL(p || SG[q]), and the teacher's log-prob of the sampled token and entropy (no grad).

    Sharing the student's vocabulary projection between the outcome term and the KL is the point: the LM head runs
    twice per view (forward, recompute in backward) instead of TRL's fused head plus a separate divergence pass.
    Transient memory is a few `chunk_size x vocab_chunk_size` fp32 tiles.

    Args:
        student_hidden: `(N, H)` student final hidden states, with grad. teacher_hidden: `(N, H)`, detached here;
            None: no teacher (the KL and the teacher's outputs are 0), for the entropy's gradient alone.
        weight: `(V, H)` student LM-head weight. bias: `(V,)` or None. labels: `(N,)` sampled tokens.
        teacher_weight, teacher_bias: the teacher's head when it is another model (frozen or EMA teacher); default
            the student's (the live teacher shares the weights).
        chunk_size: tokens per block of vocabulary tiles.
    Returns: `(logps, entropy, kl, teacher_logps, teacher_entropy)`, each `(N,)` fp32; `logps`, `entropy` and `kl`
        carry gradients (the student's only).
    """
    if teacher_weight is None:
        teacher_weight, teacher_bias = weight, bias
    transform = (logit_scale, final_logit_softcapping, 1.0 / temperature)
    return _FusedPolicyDistillation.apply(
        student_hidden, None if teacher_hidden is None else teacher_hidden.detach(), weight, bias,
        teacher_weight, teacher_bias,  # no gradient flows to it: backward returns None for the teacher's head
        labels, transform, chunk_size, vocab_chunk_size,
    )  # fmt: skip


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
    chunk_size: int = 1024,
) -> HeadScores:
    """The LM head on the tokens `selection` names, one kernel call per kind of token (SPEC 2, 3, 5):

    - `selection.plain` (valid, not distilled): TRL's log-prob kernel gives the student's log-prob and entropy (with
      `entropy_grad`, for GRPO's entropy bonus, the fused pass without a teacher: its entropy has a gradient);
    - `selection.distilled`: the fused pass gives those, the KL and the teacher's view, from one projection each;
    - `selection.teacher_only` (RLSD's rows that are not distilled): the teacher's log-prob and entropy, no grad.

    A kernel a term needs (`distill`, `rlsd`) is called even on an empty selection, so that every process makes the
    same calls (ZeRO-3 gathers the head in each).

    Args:
        hidden: `(B, T, H)` student hidden states predicting each completion token. teacher_hidden: `(R, T, H)`
            the teacher's, for the rows `selection.teacher_index` points to (`R` may be 0).
        completion_ids: `(B, T)`. head, teacher_head: the student's and the teacher's LM head (the same for a live
            teacher).
    Returns: `HeadScores`.
    """
    transform = dict(temperature=head.temperature, logit_scale=head.logit_scale,
                     final_logit_softcapping=head.final_logit_softcapping)  # fmt: skip
    # Zeros attached to the graph, so a batch with no valid token still backpropagates (as TRL's fused head does).
    logps = hidden[..., 0].float() * 0.0
    entropy, kl, teacher_logps, teacher_entropy = (torch.zeros_like(logps) for _ in range(4))

    where = selection.plain.nonzero(as_tuple=True)
    if entropy_grad:
        plain_logps, plain_entropy, *_ = fused_policy_distillation(
            hidden[where], None, head.weight, head.bias, completion_ids[where], chunk_size=chunk_size, **transform
        )
    else:
        plain_logps, plain_entropy = chunked_logps_and_entropy(
            hidden[where], head.weight, head.bias, completion_ids[where], **transform
        )
    logps, entropy = logps.index_put(where, plain_logps), entropy.index_put(where, plain_entropy)
    if distill:
        where = selection.distilled.nonzero(as_tuple=True)
        d_logps, d_entropy, d_kl, t_logps, t_entropy = fused_policy_distillation(
            hidden[where], teacher_hidden[selection.teacher_index[where[0]], where[1]], head.weight, head.bias,
            completion_ids[where], teacher_weight=teacher_head.weight, teacher_bias=teacher_head.bias,
            chunk_size=chunk_size, **transform,
        )  # fmt: skip
        logps, entropy, kl = (
            logps.index_put(where, d_logps),
            entropy.index_put(where, d_entropy),
            kl.index_put(where, d_kl),
        )
        teacher_logps = teacher_logps.index_put(where, t_logps)
        teacher_entropy = teacher_entropy.index_put(where, t_entropy)
    if rlsd:  # RLSD needs the teacher's sampled-token log-prob, not its KL
        where = selection.teacher_only.nonzero(as_tuple=True)
        with torch.no_grad():
            t_logps, t_entropy = chunked_logps_and_entropy(
                teacher_hidden[selection.teacher_index[where[0]], where[1]], teacher_head.weight, teacher_head.bias,
                completion_ids[where], **transform,
            )  # fmt: skip
        teacher_logps = teacher_logps.index_put(where, t_logps)
        teacher_entropy = teacher_entropy.index_put(where, t_entropy)
    return HeadScores(logps, entropy, kl, teacher_logps, teacher_entropy)
