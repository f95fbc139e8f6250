"""The LM-head kernels as a GPU run needs them, checked on CPU (issue 21): a token gets the same log-prob whichever
kernel scores it, in every dtype; no step of the tile loops waits on the device; one head gradient per micro-batch."""

from __future__ import annotations

import math
import weakref

import pytest
import torch
from test_trainer import make_trainer
from torch.utils._python_dispatch import TorchDispatchMode

import sdpg_trl.trainer
from bench.harness import alternating_reward
from sdpg_trl._trl_compat import logprob_forward_tile
from sdpg_trl.head_kernels import (
    TOKEN_CHUNK,
    VOCAB_TILE,
    LMHead,
    _fold_forward,
    _Stats,
    _TileBuffers,
    chunk_transient_bytes,
    chunked_logps_and_entropy,
    fused_policy_distillation,
    score_tokens,
)
from sdpg_trl.losses import loss_terms, token_selection

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VOCAB = VOCAB_TILE + 7232  # two of TRL's vocabulary tiles, the second partial


def head_inputs(n: int, hidden: int, dtype: torch.dtype, vocab: int = VOCAB, seed: int = 0):
    """fp32 leaves representable in `dtype`, with logits of a few units (the largest about 5)."""
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape, scale):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).float().requires_grad_()

    weight, bias = leaf(vocab, hidden, scale=1.0), leaf(vocab, scale=0.5)
    student, teacher = leaf(n, hidden, scale=0.3), leaf(n, hidden, scale=0.3).detach()
    labels = torch.randint(0, vocab, (n,), generator=g)
    return student, teacher, weight, bias, labels


def autocast(dtype: torch.dtype):
    return torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Point 1: one token, one log-prob
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("chunk_size", [12, 5])  # all 12 tokens in one GEMM, as TRL's kernel; or 3 chunks
def test_a_token_gets_the_same_log_prob_from_every_kernel(dtype, softcap, chunk_size):
    """The fused pass (with and without a teacher) and TRL's log-prob kernel give the same bits for a token's log-prob
    and entropy, under autocast to each dtype; the teacher's too. Both project the same tile in the compute dtype and
    fold it with TRL's code, so the bits can differ only where the GEMM itself rounds a row differently for another
    number of rows: MKL's fp32 GEMM does (by an fp32 rounding of a logit), the CPU's bf16 and fp16 GEMMs do not."""
    student, teacher, weight, bias, labels = head_inputs(12, 16, dtype)
    transform = dict(temperature=0.7, logit_scale=1.3, final_logit_softcapping=softcap)
    if dtype == torch.float32 and chunk_size < 12:
        same = lambda a, b: torch.testing.assert_close(a, b, rtol=0, atol=1e-5) is None  # noqa: E731
    else:
        same = torch.equal
    with torch.no_grad(), autocast(dtype):
        plain_logps, plain_entropy = chunked_logps_and_entropy(student, weight, bias, labels, **transform)
        teacher_logps, teacher_entropy = chunked_logps_and_entropy(teacher, weight, bias, labels, **transform)
        for with_teacher in (True, False):
            logps, entropy, kl, t_logps, t_entropy = fused_policy_distillation(
                student, teacher if with_teacher else None, weight, bias, labels, chunk_size=chunk_size, **transform
            )
            assert same(logps, plain_logps) and same(entropy, plain_entropy)
            if with_teacher:
                assert same(t_logps, teacher_logps) and same(t_entropy, teacher_entropy)
                assert (kl > 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transform", [(1.0, None, 1.0), (1.3, None, 1 / 0.7), (1.3, 4.0, 1 / 0.7)])
def test_the_in_place_cpu_fold_is_trls_fold(dtype, transform):
    """The fused pass's CPU fold (into reused fp32 tiles) leaves the same bits in the running statistics as TRL's
    torch fold, on the last, partial tile of a buffer (a view with a row stride wider than its width), for labels in
    and out of the tile, from statistics a previous tile left."""
    g = torch.Generator().manual_seed(0)
    n, width, start = 6, 40, 64
    buffers = _TileBuffers(n, 64, dtype, torch.device("cpu"))
    tile = buffers.student[:, :width]
    tile.copy_(torch.randn(n, width, generator=g) * 3)
    labels = torch.tensor([64, 70, 103, 5, 104, 130])  # in the tile [64, 104) or not
    stats = _Stats(torch.randn(n, generator=g), torch.rand(n, generator=g) + 1, torch.randn(n, generator=g),
                   torch.randn(n, generator=g))  # fmt: skip
    expected = _Stats(*(x.clone() for x in stats))
    unused = torch.zeros(n)
    scale, softcap, inv_t = transform
    logprob_forward_tile(tile, tile.stride(0), labels, expected.max, expected.sum_exp, expected.x_sum_exp, unused,
                         unused, unused, expected.label_logit, start, width, logit_scale=scale, softcap=softcap or 1.0,
                         inv_t=inv_t, HAS_SOFTCAP=softcap is not None, HAS_ENTROPY=True, HAS_LOG_SUM_SQ_PROBS=False,
                         HAS_MEAN_LOGITS=False, HAS_IS_TOP1=False, BLOCK_SIZE=1024)  # fmt: skip
    before = tile.clone()
    _fold_forward(tile, labels, stats, start, transform, buffers)
    assert all(torch.equal(a, b) for a, b in zip(stats, expected)), (stats, expected)
    assert torch.equal(tile, before)  # the logits tile is read, not written: the KL's sum reads it next


def test_score_tokens_gives_every_token_trls_log_prob_in_bf16():
    """`score_tokens` in bf16: distilled and plain tokens alike get the log-prob TRL's kernel gives them (GRPO's old
    and reference log-probs), and RLSD's teacher-only tokens the teacher's."""
    batch, length, hidden_size = 5, 4, 16
    student, teacher, weight, bias, _ = head_inputs(batch * length, hidden_size, torch.bfloat16)
    hidden, teacher_hidden = student.view(batch, length, hidden_size), teacher.view(batch, length, hidden_size)
    ids = torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    advantages, mask = torch.tensor([0.9, -0.3, 0.0, 1.2, -1.8]), torch.ones(batch, length)
    terms = loss_terms(outcome_coef=1.0, distill_coef=0.5, rlsd_lam=0.5, kl_coef=0.0)
    selection = token_selection(advantages, mask, terms, fits=True)
    assert selection.distilled.any() and selection.plain.any() and selection.teacher_only.any()
    head = LMHead(weight, bias, temperature=0.7)
    with torch.no_grad(), autocast(torch.bfloat16):
        scores = score_tokens(hidden, teacher_hidden[selection.rows], ids, selection, head, head, distill=True,
                              rlsd=True, chunk_size=3)  # fmt: skip
        expected, expected_entropy = chunked_logps_and_entropy(student, weight, bias, ids.flatten(), temperature=0.7)
        teacher_expected, _ = chunked_logps_and_entropy(teacher, weight, bias, ids.flatten(), temperature=0.7)
    assert torch.equal(scores.logps, expected.view(batch, length))
    assert torch.equal(scores.entropy, expected_entropy.view(batch, length))
    scored = selection.distilled | selection.teacher_only
    assert torch.equal(scores.teacher_logps, teacher_expected.view(batch, length) * scored)


def test_on_policy_step_in_bf16_has_ratio_one_and_zero_kl(tmp_path, tokenizer, tiny_model_dir, monkeypatch):
    """A whole SDPG step in bf16 autocast on CPU, on-policy, with the old log-probs computed at generation (GRPO does
    so whenever it reuses a batch, and always under vLLM): the ratio is exactly 1 on every token, distilled or not,
    and the anchor's `kl` to the (identical) reference is exactly 0 at step 0."""
    seen = []
    per_token_terms = sdpg_trl.trainer.per_token_terms

    def spy(args, inputs, mask, scores, selection, step, **kwargs):
        seen.append((scores.logps.detach(), inputs["old_per_token_logps"], mask.bool(), selection.distilled))
        return per_token_terms(args, inputs, mask, scores, selection, step, **kwargs)

    monkeypatch.setattr(sdpg_trl.trainer, "per_token_terms", spy)
    trainer = make_trainer(tmp_path, tiny_model_dir, tokenizer, bf16=True, num_iterations=2, max_steps=1)
    trainer.reward_funcs = [alternating_reward]  # half of each group passes the gate
    trainer.train()
    logps, old_logps, mask, distilled = seen[0]
    assert distilled.any() and (mask & ~distilled).any()
    ratio = torch.exp(logps - old_logps)[mask]
    assert (ratio == 1).all(), f"on-policy ratios in [{ratio.min().item()}, {ratio.max().item()}]"
    log = next(h for h in trainer.state.log_history if "kl" in h)
    assert log["kl"] == 0.0 and log["sdpg/distill_kl"] > 0 and math.isfinite(log["loss"])


# ---------------------------------------------------------------------------------------------------------------------
# Point 4: no host sync in the kernels' loops
# ---------------------------------------------------------------------------------------------------------------------
class HostSyncs(TorchDispatchMode):
    """Counts the operations that make the host wait for the device's data: `nonzero`, `.item()` / `bool(tensor)` /
    `.tolist()` (`_local_scalar_dense`), and the other ops whose output size depends on tensor values."""

    SYNCS = {"nonzero", "_local_scalar_dense", "is_nonzero", "masked_select", "unique", "_unique2", "equal",
             "allclose", "repeat_interleave"}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(i is not None and i.dtype == torch.bool for i in args[1])
        if name in self.SYNCS or bool_index:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("with_teacher", [True, False])
def test_no_host_sync_in_the_fused_pass(with_teacher):
    """Forward and backward over 3 token chunks x 2 vocabulary tiles, every gradient term on: no host sync at all
    (an index of the labels found with `nonzero` made 2 per chunk and tile)."""
    student, teacher, weight, bias, labels = head_inputs(9, 8, torch.float32)
    with HostSyncs() as syncs:
        logps, entropy, kl, _, _ = fused_policy_distillation(
            student, teacher if with_teacher else None, weight, bias, labels, chunk_size=4
        )
        (logps.sum() + entropy.sum() + kl.sum()).backward()
    assert syncs.ops == []


def test_score_tokens_syncs_once_per_selection_whatever_the_chunks():
    """`score_tokens` finds its tokens with one `nonzero` per selection (distilled, plain, RLSD's teacher-only),
    outside the tile loops: as many with 1-token chunks as with one chunk."""
    batch, length, hidden_size = 4, 3, 8
    student, teacher, weight, bias, _ = head_inputs(batch * length, hidden_size, torch.float32)
    ids = torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    terms = loss_terms(outcome_coef=1.0, distill_coef=0.5, rlsd_lam=0.5, kl_coef=0.0)
    selection = token_selection(torch.tensor([1.0, -1.0, 2.0, -2.0]), torch.ones(batch, length), terms, fits=True)
    hidden, teacher_hidden = student.view(batch, length, -1), teacher.view(batch, length, -1)[selection.rows]
    counts = []
    for chunk in (1, 64):
        with HostSyncs() as syncs:
            scores = score_tokens(hidden, teacher_hidden, ids, selection, LMHead(weight, bias), LMHead(weight, bias),
                                  distill=True, rlsd=True, entropy_grad=True, chunk_size=chunk)  # fmt: skip
            (scores.logps.sum() + scores.entropy.sum() + scores.distill_kl.sum()).backward()
        counts.append(syncs.ops)
    assert counts == [["nonzero"] * 3] * 2, counts


# ---------------------------------------------------------------------------------------------------------------------
# Point 5: one head gradient per micro-batch
# ---------------------------------------------------------------------------------------------------------------------
class HeadGradients(TorchDispatchMode):
    """Counts the fp32 tensors of the head's shape created afresh (not views or in-place results of an input)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = torch.Size(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}  # fmt: skip
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.shape == self.shape and t.dtype == torch.float32:
                self.count += t.untyped_storage().data_ptr() not in inputs
        return out


@pytest.mark.parametrize("tokens", ["some", "none"])
def test_one_head_gradient_per_micro_batch(tokens):
    """Full fine-tuning: `score_tokens` with distilled and plain tokens allocates one fp32 `(V, H)` gradient (it was
    one per kernel call, and autograd's sum of the two); with no valid token, none."""
    batch, length, hidden_size = 4, 3, 8
    student, teacher, weight, bias, _ = head_inputs(batch * length, hidden_size, torch.float32)
    ids = torch.randint(VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, length) if tokens == "some" else torch.zeros(batch, length)
    terms = loss_terms(outcome_coef=1.0, distill_coef=0.5, rlsd_lam=0.0, kl_coef=0.0)
    selection = token_selection(torch.tensor([1.0, -1.0, 2.0, -2.0]), mask, terms, fits=True)
    hidden, teacher_hidden = student.view(batch, length, -1), teacher.view(batch, length, -1)[selection.rows]
    with HeadGradients(weight.shape) as allocations:
        scores = score_tokens(hidden, teacher_hidden, ids, selection, LMHead(weight, bias), LMHead(weight, bias),
                              distill=True, rlsd=False)  # fmt: skip
        (scores.logps.sum() + scores.distill_kl.sum()).backward()
    assert allocations.count == (1 if tokens == "some" else 0)
    assert weight.grad is None if tokens == "none" else torch.isfinite(weight.grad).all()


# ---------------------------------------------------------------------------------------------------------------------
# The chunk defaults' rule and the memory table (docs/PERFORMANCE.md, bench/head_memory.py)
# ---------------------------------------------------------------------------------------------------------------------
def test_default_token_chunk_is_the_largest_power_of_two_within_trls_own_tile():
    """SDPG's head never takes more transient memory than GRPO's: a token chunk's tiles fit in TRL's log-prob tile
    (4096 x 32768 in bf16, 256 MiB), and twice the chunk would not."""
    budget = 4096 * VOCAB_TILE * 2
    assert chunk_transient_bytes(TOKEN_CHUNK) <= budget < chunk_transient_bytes(2 * TOKEN_CHUNK)
    assert TOKEN_CHUNK & (TOKEN_CHUNK - 1) == 0


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages the operations run under it create, alive at each moment, and their peak."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def _free(self, ptr: int) -> None:
        self.now -= self.live.pop(ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}  # fmt: skip
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in self.live or ptr in inputs or storage.nbytes() == 0:
                continue
            self.live[ptr] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, ptr)  # torch keeps one Python storage per storage: freed with it
        return out


def test_a_distilled_chunk_takes_the_memory_chunk_transient_bytes_counts():
    """The model behind the chunk rule and the memory table, measured: over 4 distilled chunks of 16 tokens x 3
    tiles 512 wide in bf16, forward and backward each peak at `chunk_transient_bytes` beyond what they keep (outputs
    and statistics; the fp32 gradient buffers), up to per-row vectors: one chunk's tiles at a time, each tile freed
    before the next is made. (On CPU, the peaks fall where neither TRL's torch backward fold nor its fp32 GEMM
    upcasts.)"""
    n, chunk, tile, vocab, hidden = 64, 16, 512, 1536, 8
    student, teacher, weight, _, labels = head_inputs(n, hidden, torch.bfloat16, vocab=vocab)
    student, teacher, weight = student.detach().bfloat16(), teacher.bfloat16(), weight.detach().bfloat16()
    student.requires_grad_(), weight.requires_grad_()
    counted = chunk_transient_bytes(chunk, torch.bfloat16, tile)
    with LiveBytes() as forward:
        logps, entropy, kl, _, _ = fused_policy_distillation(student, teacher, weight, None, labels, chunk_size=chunk,
                                                             vocab_chunk_size=tile)  # fmt: skip
    small = 4096  # per-row statistics and gradients, a few `(chunk,)` and `(n,)` fp32 vectors
    # The outputs and saved statistics are kept; the folds (the tile in fp32, its exponentials and their product) and
    # the KL's sum share the same 3 fp32 tiles, freed when the forward returns.
    assert counted <= forward.peak - forward.now <= counted + small, (forward.peak, forward.now, counted)
    with LiveBytes() as backward:
        (logps + entropy + kl).sum().backward()
    gradients = n * hidden * 4 + vocab * hidden * 4  # the fp32 accumulators (their bf16 copies come after the tiles)
    assert counted <= backward.peak - gradients <= counted + small, (backward.peak, counted)
