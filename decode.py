"""decode.py: everything that turns a trained model into text (the paper's decoding:
docs/method.md).

- AR: greedy search, and beam search with a finished set (as GNMT, fairseq and the official
  beamsearch.py do): each step the 2k best extensions of the k live hypotheses are taken; those
  ending in <eos> join the sentence's finished set, ranked by the GNMT length-normalised score
  log p / ((5 + |y|) / 6)^alpha; the k best others stay live; a sentence stops when no live
  hypothesis can still beat its k-th finished one (exact). N-best lists = the N best finished (the
  E-step asks for N = 20 candidates per training source). The beams of a sentence share its encoder
  states, and a sentence leaves the batch once its search is done.
- NAR: the predicted length, or the official window of B lengths around it, all decoded in one
  batched pass; argmax or ODD (optimal de-duplicated) decoding: the best sequence of that length
  with no two equal neighbours, by Viterbi over the top-3 tokens of each position, batched on the
  model's device.
- NPD rescoring: the AR model scores every length candidate in one teacher-forced pass (float32).
- Decoders never emit <pad>, <bos> or <unk> (nor <eos> for the NAR model); scoring a given target
  masks nothing.
- BLEU with sacreBLEU, and a command-line translator and latency benchmark:

    python decode.py --checkpoint runs/toy-toy/em2-nar --input source.txt
    python decode.py --checkpoint runs/toy-toy/em2-nar --rescore-with runs/toy-toy/em2-ar \\
        --length-beam 9
    python decode.py --benchmark --preset iwslt

- The fast path (on CUDA): the same decoders on fixed-size buffers, each step replayed as a CUDA
  graph (section "The fast path").

Hot loops (beam steps, Viterbi steps) are tensor work with no host synchronisation, except the beam
search's "which sentences are done?" test, which runs every EARLY_STOP_EVERY steps.
"""
import argparse
import os
import sys
import time
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F

from data import BPE, DataError, Vocab, make_batches, pad_batch, read_lines, remove_bpe
from model import (ACTIVE_COUNTERS, ATTENTION_BACKENDS, BOS, EOS, PAD, PRECISIONS, PRESETS, UNK,
                   CheckpointError, Counts, Transformer, additive_mask, attention_backend,
                   check_device, keep_freed_memory_on_cpu, load_checkpoint, model_config,
                   padding_mask, pick_device, precision_context, progress_bar, resolve_precision,
                   synchronize)
from options import HelpFormatter

EARLY_STOP_EVERY = 4          # beam steps between "are all beams finished?" host checks
# an AR output holds at most |x| + 20 tokens, as in the official code
OUTPUT_RATIO, OUTPUT_EXTRA = 1, 20
NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------
# AR decoding
# ------------------------------------------------------------------------------------------------
def length_penalty(lengths, alpha):
    """GNMT length penalty ((5 + len) / 6)^alpha, len counting the final <eos>; a hypothesis is
    ranked by its log-probability divided by it. alpha = 0 ranks by raw log-probability. lengths: a
    tensor or an int."""
    return ((5.0 + lengths) / 6.0) ** alpha


def max_output_len(src, model):
    """Most output tokens (not counting <eos>) allowed per sentence: OUTPUT_RATIO * |x| +
    OUTPUT_EXTRA, capped by the model's max_len: (batch,). At that length the AR model is forced to
    end."""
    src_len = (src != PAD).sum(1)
    return (OUTPUT_RATIO * src_len + OUTPUT_EXTRA).long().clamp(max=model.cfg.max_len)


def allow_only_eos(logp, at_limit):
    """Where at_limit (rows, 1) is true, every token but <eos> is forbidden: the output has reached
    its maximum length. logp: (rows, vocab)."""
    not_eos = torch.arange(logp.size(-1), device=logp.device) != EOS
    return logp.masked_fill(at_limit & not_eos, NEG_INF)


@torch.no_grad()
def ar_greedy(model, src, max_len=None):
    """Greedy AR decoding. src: (batch, src_len) -> tokens (batch, out_len), PAD after the end.
    An output holds at most max_len tokens (then <eos> is forced)."""
    max_len = max_output_len(src, model) if max_len is None else max_len
    enc, keep = model.encode(src)
    keep = additive_mask(keep)                # once per batch, not at every step (attention_mask)
    cache, steps = model.new_cache(), int(max_len.max()) + 1
    token = src.new_full((src.size(0),), BOS)
    finished = torch.zeros_like(token, dtype=torch.bool)
    out = []
    for step in range(steps):
        token = greedy_next(model, token, step, enc, keep, cache, max_len, finished)
        out.append(token)
        finished |= token == EOS
        if (step + 1) % EARLY_STOP_EVERY == 0 and bool(finished.all()):   # host sync
            break
    tokens = torch.stack(out, 1)                                          # (batch, steps)
    return tokens.masked_fill(tokens == EOS, PAD)


def greedy_next(model, token, step, enc, keep, cache, max_len, finished):
    """One greedy step: the most likely next token of every row (batch,), <eos> forced at the length
    limit, PAD for rows already finished. step: an int, or a (1,) tensor (the fast path)."""
    logits = model.ar_step(token, step, enc, keep, cache).float()         # (batch, vocab)
    token = allow_only_eos(logits, (step >= max_len)[:, None]).argmax(-1)
    return token.masked_fill(finished, PAD)




@dataclass
class BeamState:
    """The beam search of the sentences still searching. Row i of every per-sentence tensor belongs
    to sentence `index[i]` of the batch; hypothesis rows are grouped by sentence, `beam` rows
    each."""
    index: torch.Tensor        # (n,) positions in the batch
    max_len: torch.Tensor      # (n,) most output tokens allowed
    # min(max_len), on the host: before that step no output is forced to end
    shortest_limit: int
    bound: torch.Tensor        # (n,) length penalty of the longest allowed output: the stop test's
    tokens: torch.Tensor       # (n * beam, 1 + step) live hypotheses, <bos> first
    scores: torch.Tensor       # (n, beam) their raw log-probabilities (-inf: no hypothesis)
    fin_tokens: torch.Tensor   # (n, beam, steps) the best finished hypotheses, without <eos>
    fin_scores: torch.Tensor   # (n, beam) their length-normalised scores, best first

    def keep(self, rows, beam):
        """Only the sentences `rows` (n',) go on searching."""
        hyp_rows = (rows[:, None] * beam + torch.arange(beam, device=rows.device)).view(-1)
        max_len = self.max_len[rows]
        return BeamState(self.index[rows], max_len, int(max_len.min()), self.bound[rows],
                         self.tokens[hyp_rows], self.scores[rows], self.fin_tokens[rows],
                         self.fin_scores[rows]), hyp_rows


def best_extensions(scores, logits, log_norm, width):
    """The `width` best one-token extensions of every sentence's live hypotheses, by raw
    log-probability. scores: (n, beam) raw log-probabilities of the live hypotheses; logits:
    (n * beam, vocab) their next-token logits, tokens never emitted at -inf; log_norm: (n * beam, 1)
    their log-sum-exp.
    Within one hypothesis log-probabilities rank like logits, so its `width` best tokens by logit
    hold all it can contribute: top-k per row, then top-k per sentence, and no (rows, vocab)
    log-softmax is written. Returns scores (n, width), the hypothesis each came from (n, width) and
    its token."""
    n, k = scores.shape
    per_row = min(width, logits.size(1))
    top_logit, top_token = logits.topk(per_row, dim=1)                    # (n * beam, per_row)
    # log-softmax of the top few
    logp = top_logit - log_norm
    cand = (scores.view(-1, 1) + logp).view(n, k * per_row)
    cand, flat = cand.topk(width, dim=1)                                   # (n, width)
    return cand, flat // per_row, top_token.view(n, k * per_row).gather(1, flat)


def beam_step(state, logits, step, beam, alpha):
    """One step of beam search with a finished set (GNMT, fairseq, the official beamsearch.py), for
    every sentence at once (n sentences, k = beam hypotheses each). logits: (n * k, vocab)
    next-token logits of the live hypotheses, row i * k + j holding hypothesis j of sentence i, the
    tokens never emitted at -inf. Of the 2k best extensions by raw log-probability, those that end
    in <eos> join the sentence's finished set, ranked by their length-normalised score; the k best
    that do not end stay live.
    So a finished hypothesis never takes a live slot, and never competes on its raw log-probability.

    What ar_beam_search and the tests expect of it:
    - A token's log-probability is its logit minus the log-sum-exp of its row, taken over the row as
      given, before anything is forbidden. At a sentence's length limit (step >= state.max_len) only
      <eos> may follow (allow_only_eos), and that forced <eos> keeps its real log-probability (the
      same normaliser), not log 1 = 0. best_extensions finds the best extensions without a full
      log-softmax.
    - Finished set: fin_tokens (n, k, steps) holds each finished output without <bos> and <eos>,
      PAD-padded; fin_scores (n, k) its raw log-probability (the <eos> included) over
      length_penalty(step + 1, alpha), best first, -inf where the set holds fewer than k. Of equal
      scores (finished or live) either may come first or be kept: no tie rule is graded.
    - Live hypotheses: tokens (n * k, step + 2) are the parents' rows with the new token appended,
      scores (n, k) their raw log-probabilities, best first, -inf for an empty slot.
    - Stop test (exact): a sentence is done when its best live raw score over state.bound (its own
      length_penalty(max_len + 1)) is <= (equal too) its k-th finished score. A done sentence is
      signalled by all k of its live scores set to -inf: that is what ar_beam_search reads.
    - rows (n * k,): for each new live hypothesis, the row of logits (and of the model's cache) it
      extends, over the whole batch: sentence i's rows lie in i * k ... i * k + k - 1.
      ar_beam_search reorders the model's cache with them, so that every hypothesis goes on reading
      its own history.
    Returns the new state and rows."""
    # >>> exercise 6: beam search with a finished set
    n, k, steps = state.scores.size(0), beam, state.fin_tokens.size(2)
    log_norm = logits.logsumexp(dim=1, keepdim=True)                      # (n * beam, 1) softmax
                                                                           # normaliser
    if step >= state.shortest_limit:                                       # a host int: no sync
        # At the length limit only <eos> may follow, with its real log-probability (same
        # normaliser).
        logits = allow_only_eos(logits, (step >= state.max_len).repeat_interleave(k)[:, None])
    cand, origin, token = best_extensions(state.scores, logits, log_norm, 2 * k)   # (n, 2k) each
    ends = token == EOS
    # Ended extensions: their prefix (without <bos>) and normalised score, merged into the finished
    # set.
    prefix = state.tokens.view(n, k, -1)[:, :, 1:].gather(1, origin[..., None].expand(-1, -1, step))
    ended = F.pad(prefix, (0, steps - step), value=PAD)                    # (n, 2k, steps)
    ended_scores = (cand / length_penalty(step + 1, alpha)).masked_fill(~ends, NEG_INF)
    fin_scores, pick = torch.cat([state.fin_scores, ended_scores], 1).topk(k, dim=1)   # (n, k)
    fin_tokens = torch.cat([state.fin_tokens, ended], 1).gather(
        1, pick[..., None].expand(-1, -1, steps))
    # Live: the k best extensions that do not end.
    scores, pick = cand.masked_fill(ends, NEG_INF).topk(k, dim=1)         # (n, k)
    rows = (origin.gather(1, pick) + torch.arange(n, device=origin.device)[:, None] * k).view(-1)
    tokens = torch.cat([state.tokens.index_select(0, rows), token.gather(1, pick).view(-1, 1)],
                       dim=1)
    # Exact stop test: log-probabilities only fall as a hypothesis grows and the penalty grows with
    # its length, so no extension of a live hypothesis can score above (best live raw score) /
    # (penalty of the longest allowed output). Once that cannot beat the k-th finished score, the
    # sentence is done.
    done = scores[:, 0] / state.bound <= fin_scores[:, -1]
    scores = scores.masked_fill(done[:, None], NEG_INF)
    return replace(state, tokens=tokens, scores=scores, fin_tokens=fin_tokens,
                   fin_scores=fin_scores), rows
    # <<< exercise 6


@torch.no_grad()
def ar_beam_search(model, src, beam=5, alpha=1.0, nbest=1, max_len=None):
    """Batched beam search with a finished set. src: (batch, src_len); nbest <= beam.
    Returns tokens (batch, nbest, out_len) PAD-padded without <eos>, and their length-normalised
    scores log p(y <eos> | x) / length_penalty(|y| + 1) (batch, nbest), best first. An output holds
    at most max_len tokens (default max_output_len); a hypothesis that reaches it is forced to end,
    so every sentence gets `beam` finished hypotheses (when its output space holds that many).
    The beams of a sentence share one copy of its encoder states. Every EARLY_STOP_EVERY steps, one
    host sync asks which sentences are done; those leave the batch, so the work shrinks as they end.
    The last step allows only <eos>, so every search is done by then and has left the batch.
    After every beam_step the model's cache is reordered by the rows it returns
    (model.reorder_cache): the cache row of a hypothesis must hold its own prefix. A sentence is
    done when beam_step has set all its live scores to -inf."""
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest must be between 1 and the beam size {beam}, not {nbest}")
    b, k, device = src.size(0), beam, src.device
    max_len = max_output_len(src, model) if max_len is None else max_len.to(device)
    # host syncs before the loop
    steps = int(max_len.max()) + 1
    # (batch, src_len+1, d), one per sentence
    enc, keep = model.encode(src)
    keep = additive_mask(keep)                # once per batch, not at every step (attention_mask)
    cache = model.new_cache()
    scores = torch.full((b, k), NEG_INF, device=device)
    # one live hypothesis at first
    scores[:, 0] = 0.0
    state = BeamState(index=torch.arange(b, device=device), max_len=max_len,
                      shortest_limit=int(max_len.min()), bound=length_penalty(max_len + 1, alpha),
                      tokens=src.new_full((b * k, 1), BOS), scores=scores,
                      fin_tokens=src.new_full((b, k, steps), PAD),
                      fin_scores=torch.full((b, k), NEG_INF, device=device))
    out_tokens, out_scores = (src.new_full((b, k, steps), PAD),
                              torch.full((b, k), NEG_INF, device=device))
    for step in range(steps):
        # (n * beam, vocab)
        logits = model.ar_step(state.tokens[:, -1], step, enc, keep, cache).float()
        state, rows = beam_step(state, logits, step, k, alpha)
        model.reorder_cache(cache, rows)
        if (step + 1) % EARLY_STOP_EVERY and step + 1 < steps:
            continue
        searching = (state.scores[:, 0] > NEG_INF).nonzero().squeeze(1)   # host sync
        if searching.numel() < state.index.numel():                       # some sentences are done
            out_tokens[state.index], out_scores[state.index] = state.fin_tokens, state.fin_scores
            if searching.numel() == 0:
                break
            state, hyp_rows = state.keep(searching, k)
            enc, keep = enc.index_select(0, searching), keep.index_select(0, searching)
            model.shrink_cache(cache, hyp_rows, searching)
    return out_tokens[:, :nbest], out_scores[:, :nbest]


# ------------------------------------------------------------------------------------------------
# NAR decoding
# ------------------------------------------------------------------------------------------------
def odd_viterbi(logp, lengths, k=3):
    """ODD (optimal de-duplicated) decoding: argmax over y of sum_t logp[t, y_t] subject to
    y_t != y_{t-1}, for each row of a batch, by Viterbi over the top-k tokens of every position.
    k = 3 is exact, not an approximation: a position has two neighbours, which forbid at most two
    tokens, so one of its top three is always allowed and at least as good as any token outside
    them. logp: (batch, t, vocab), the tokens never emitted at -inf (decoding_log_probs; nar_decode
    passes the logits, which rank each position's tokens alike); lengths: (batch,), each row its
    own, from 1 to t (t may be 1); logp is left as given (the caller may read it again). No two
    neighbours are equal however unlikely every alternative is. Returns tokens (batch, t), PAD after
    each row's length, and scores (batch,): the sum over the row's real positions only; all on
    logp's device, where every tensor it makes lies too."""
    # >>> exercise 4: ODD Viterbi
    n, t, _ = logp.shape
    top_val, top_tok = logp.topk(min(k, logp.size(-1)), dim=-1)           # (batch, t, k)
    real = torch.arange(t, device=logp.device)[None, :] < lengths[:, None]  # (batch, t)
    top_val = top_val.masked_fill(~real[..., None], 0.0)                   # past the end: free
    # transition[b, s, i, j]: moving from candidate i at position s to candidate j at s + 1.
    same = top_tok[:, :-1, :, None] == top_tok[:, 1:, None, :]             # (batch, t-1, k, k)
    transition = (same & real[:, 1:, None, None]).float() * -1e9
    delta, backpointers = top_val[:, 0], []                                # (batch, k)
    for s in range(1, t):
        best_prev, arg_prev = (delta[:, :, None] + transition[:, s - 1]).max(dim=1)   # (batch, k)
        delta = best_prev + top_val[:, s]
        backpointers.append(arg_prev)
    score, choice = delta.max(dim=1)                                       # (batch,)
    path = [choice]
    for arg_prev in reversed(backpointers):
        choice = arg_prev.gather(1, choice[:, None]).squeeze(1)
        path.append(choice)
    path = torch.stack(path[::-1], dim=1)                                  # (batch, t)
    tokens = top_tok.gather(2, path[..., None]).squeeze(-1)
    return tokens.masked_fill(~real, PAD), score
    # <<< exercise 4


def argmax_decode(logp, lengths):
    """Plain NAR decoding: the most likely token at every position. Same shapes as odd_viterbi."""
    score, tokens = logp.max(dim=-1)                                       # (batch, t)
    real = torch.arange(logp.size(1), device=logp.device)[None, :] < lengths[:, None]
    return tokens.masked_fill(~real, PAD), score.masked_fill(~real, 0.0).sum(1)


def length_window(center, beam, max_len):
    """The B = `beam` length candidates around the predicted lengths `center` (batch,), as the
    official code builds them: B consecutive lengths from max(L - floor(B/2), 1), shifted down where
    they would pass max_len, so there are always B distinct lengths (for B <= max_len). Every
    sentence of the batch gets the window around its own centre. -> (batch, beam) integer
    lengths, on the device of `center`, where every tensor it makes lies too."""
    # >>> exercise 5: the length window and NPD rescoring
    start = (center - beam // 2).clamp(min=1).clamp(max=max(max_len - beam + 1, 1))
    return (start[:, None] + torch.arange(beam, device=center.device)).clamp(max=max_len)
    # <<< exercise 5


def npd_scores(rescorer, src, tokens, lengths, alpha):
    """NPD (noisy parallel decoding): the AR model's score of each NAR candidate,
    log p_AR(y <eos> | x) over the length penalty of |y| + 1 (as beam search ranks finished
    outputs).
    src: (rows, src_len), one row per candidate; tokens: (rows, t) PAD-padded; lengths: (rows,).
    rescorer.score(src, tokens) gives log p_AR(y <eos> | x) of every row, in float32."""
    # >>> exercise 5: the length window and NPD rescoring
    return rescorer.score(src, tokens) / length_penalty(lengths + 1, alpha)
    # <<< exercise 5


@torch.no_grad()
def nar_decode(model, src, length_beam=1, odd=True, rescorer=None, alpha=1.0, lengths=None):
    """NAR decoding of a batch: the predicted length L (or the given `lengths`, for oracle-length
    analysis) and, for a length beam B, the window of B lengths around it (length_window), all
    decoded in one pass by ODD or argmax. Each candidate is scored by the NAR model (log p(T|x) +
    its tokens' log-probs) or, with an AR `rescorer`, by the AR log-likelihood over the length
    penalty (NPD, in float32); the best is kept. src: (batch, src_len) -> tokens (batch, out_len),
    PAD-padded."""
    enc, keep, len_logp, cand_len = length_candidates(model, src, length_beam, lengths)
    return decode_lengths(model, src, enc, keep, len_logp, cand_len, odd, rescorer, alpha)


def length_candidates(model, src, length_beam, lengths=None):
    """nar_decode's first half: the encoder's states and mask, the length log-probabilities
    (batch, max_len+1) and the window of candidate lengths (batch, length_beam) around the predicted
    (or given) length."""
    enc, keep = model.encode(src)
    len_logp = model.length_logits(enc).float().log_softmax(-1)           # (batch, max_len+1)
    len_logp[:, 0] = NEG_INF                                               # no empty outputs
    center = len_logp.argmax(-1) if lengths is None else lengths
    return enc, keep, len_logp, length_window(center, length_beam, model.cfg.max_len)


def decode_lengths(model, src, enc, keep, len_logp, cand_len, odd, rescorer, alpha, out_len=None):
    """nar_decode's second half: every candidate length decoded in one pass, each candidate scored
    (NPD or the NAR model's own score), the best kept: (batch, out_len) tokens. out_len: the number
    of positions decoded (default: the longest candidate; the fast path gives a fixed bound)."""
    b, beam = cand_len.shape
    flat_len = cand_len.view(-1)
    enc, keep = enc.repeat_interleave(beam, 0), keep.repeat_interleave(beam, 0)
    # ODD and argmax need each position's best tokens, which the logits rank as the
    # log-probabilities do: the full (rows, t, vocab) log-softmax is never written, only each
    # position's normaliser, subtracted from the candidates' scores. (b*beam, t, vocab), the
    # never-emitted tokens at -inf:
    states = model.nar_states(flat_len, enc, keep, out_len)
    logits = model.output_logits(states, banned=True).float()
    tokens, token_score = (odd_viterbi if odd else argmax_decode)(logits, flat_len)
    real = padding_mask(flat_len, logits.size(1))                          # (b*beam, t)
    token_score = token_score - logits.logsumexp(-1).masked_fill(~real, 0.0).sum(1)
    if rescorer is not None and beam > 1:
        score = npd_scores(rescorer, src.repeat_interleave(beam, 0), tokens, flat_len, alpha)
    else:
        score = len_logp.gather(1, cand_len).view(-1) + token_score
    best = score.view(b, beam).argmax(1)                                   # (batch,)
    return tokens.view(b, beam, -1)[torch.arange(b, device=src.device), best]


# ------------------------------------------------------------------------------------------------
# The fast path: fixed shapes, replayed as CUDA graphs
# ------------------------------------------------------------------------------------------------
# On a GPU, the decoders above are limited by the host, not the arithmetic: each of the ~150 small
# operations of a decoding step is one kernel launch of tens of microseconds, so at batch 1 the GPU
# mostly waits. The fast path computes exactly what they compute, on buffers of fixed size: a
# key/value cache preallocated for every step (model.new_fixed_cache), the step counter on the
# device, source and output lengths rounded up to a bucket. With every shape fixed, one decoding
# step can be recorded once as a CUDA graph and replayed: one launch per step instead of ~150.
# Sentences that finish stay in the batch (their scores are -inf) instead of leaving it, so the
# shapes do not change. On the CPU and MPS nothing is recorded: the same code runs eagerly, which is
# how the tests check, on any machine, that the fast path gives the reference decoders' tokens and
# scores.
# decode.py uses it on CUDA (use_fast_path); the readable decoders above stay the reference.
FAST_PATH_DEVICES = ("cuda",)
BUCKET = 8                    # source lengths and decoding steps are rounded up to a multiple of it
GRAPH_WARMUP = 2              # eager runs before a graph is recorded (lazy initialisation,
                              # autotuning)
MAX_SESSIONS = 4              # buffer sets (one per shape) kept per model: batches come sorted by
                              # length, so the same shape repeats in a row


# Token budget of a decoding batch (rows x source tokens, as decode_corpus counts) per token of a
# training batch. On the CPU the work grows with the batch and 4x the training budget is what em-nat
# has always used. On a GPU a decoding step costs about the same for one row as for thousands
# (launch-bound), so fewer, larger batches pay: the E-step's 20-best of the embedded task's 6,000
# sources takes 89 batches at 4x and about 11 at 32x.
DECODE_BUDGET = {"cuda": 32}
DECODE_BUDGET_ELSEWHERE = 4


def default_decode_tokens(device, max_tokens):
    """The decoding batches' token budget for a device and a training budget max_tokens."""
    return max_tokens * DECODE_BUDGET.get(torch.device(device).type, DECODE_BUDGET_ELSEWHERE)


def use_fast_path(device):
    """Where the fast path pays: on CUDA (one graph replay per step instead of ~150 launches). On
    the CPU there are no launches to save and the fixed-size cache costs more than it saves."""
    return torch.device(device).type in FAST_PATH_DEVICES


def round_up(n, bucket=BUCKET):
    return -(-n // bucket) * bucket


def autocast_state(device_type):
    """(enabled, dtype) of the autocast active on `device_type`: a graph records its casts."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):                      # torch < 2.4: only the CUDA autocast
        enabled = device_type == "cuda" and torch.is_autocast_enabled()
        return enabled, torch.get_autocast_gpu_dtype() if enabled else None


class Graphed:
    """fn() (no arguments: it reads and writes tensors that its owner keeps) recorded once as a CUDA
    graph, then replayed at every call; on other devices a plain call. Its result tensors are the
    graph's own: every replay overwrites them."""

    def __init__(self, fn, device):
        self.fn, self.device, self.graph, self.out = fn, torch.device(device), None, None
        self.eager = self.device.type != "cuda"

    def __call__(self):
        if self.eager:
            return self.fn()
        if self.graph is None:
            try:
                self.graph, self.out = self.record()
            except RuntimeError as err:
                # A kernel this GPU and torch cannot record: the same step, launched eagerly.
                why = (str(err).strip() or repr(err)).splitlines()[0]
                warnings.warn(f"decode.py: a CUDA graph could not be recorded ({why}); that step "
                              f"runs without one")
                self.eager = True
                return self.fn()
        self.graph.replay()
        for counter in ACTIVE_COUNTERS:
            counter.graph_replay()
        return self.out

    def record(self):
        enabled, dtype = autocast_state("cuda")
        # An autocast that caches its weight casts would hand the graph tensors freed at its exit.
        casts = (torch.autocast("cuda", dtype=dtype, cache_enabled=False) if enabled
                 else nullcontext())
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with casts, torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP):
                self.fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with casts, torch.cuda.graph(graph):
            out = self.fn()
        return graph, out


class FixedShapes:
    """What the fast path's greedy and beam sessions share: the buffers of `rows` sentences of at
    most src_len tokens decoded for at most `steps` steps, the step counter on the device and the
    cache positions written so far, and the two recorded calls: start() encodes and resets, step()
    decodes one token for every row. A session sets `live` (any sentence still searching?) at the
    end of each step."""

    def __init__(self, model, rows, src_len, steps):
        device = model.embed.weight.device
        self.model, self.steps = model, steps
        self.src = torch.full((rows, src_len), PAD, dtype=torch.long, device=device)
        self.max_len = torch.zeros(rows, dtype=torch.long, device=device)
        self.at = torch.zeros(1, dtype=torch.long, device=device)        # the step being decoded
        self.positions = torch.arange(steps, device=device)
        self.visible = torch.zeros(1, 1, 1, steps, dtype=torch.bool, device=device)
        self.live = torch.ones((), dtype=torch.bool, device=device)
        self.start, self.step = Graphed(self.encode, device), Graphed(self.decode_step, device)

    def see_written_positions(self):
        """The cache positions this step's query may attend to: those written so far."""
        self.visible.copy_((self.positions <= self.at).view(1, 1, 1, -1))

    def searching(self):
        return bool(self.live)                                           # host sync


class GreedySession(FixedShapes):
    """Greedy decoding on fixed buffers (FixedShapes)."""

    def __init__(self, model, rows, src_len, steps):
        super().__init__(model, rows, src_len, steps)
        device = self.src.device
        self.token = torch.full((rows,), BOS, dtype=torch.long, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.out = torch.full((rows, steps), PAD, dtype=torch.long, device=device)

    def encode(self):
        enc, keep = self.model.encode(self.src)
        self.enc, self.keep = enc, additive_mask(keep)
        self.cache, _ = self.model.new_fixed_cache(len(self.token), self.steps,
                                                   self.model.cross_keys_values(enc), self.at,
                                                   self.visible)
        self.at.zero_()
        self.token.fill_(BOS)
        self.finished.zero_()
        self.out.fill_(PAD)

    def decode_step(self):
        self.see_written_positions()
        token = greedy_next(self.model, self.token, self.at, self.enc, self.keep, self.cache,
                            self.max_len, self.finished)
        self.out.index_copy_(1, self.at, token[:, None])
        self.finished |= token == EOS
        self.token.copy_(token)
        self.at += 1
        self.live.copy_(~self.finished.all())


class BeamSession(FixedShapes):
    """Beam search (beam k, length penalty alpha) on fixed buffers (FixedShapes): the same steps as
    ar_beam_search and beam_step, with the live hypotheses' tokens in a (rows * k, 1 + steps)
    buffer written one column per step, and done sentences kept in the batch."""

    def __init__(self, model, rows, src_len, steps, k, alpha):
        super().__init__(model, rows, src_len, steps)
        device = self.src.device
        self.k, self.alpha = k, alpha
        # The length penalty of an output ending at each step, computed on the host as beam_step
        # does.
        self.penalty = torch.tensor([length_penalty(t + 1, alpha) for t in range(steps)],
                                    device=device)
        self.tokens = torch.full((rows * k, 1 + steps), PAD, dtype=torch.long, device=device)
        self.scores = torch.full((rows, k), NEG_INF, device=device)
        self.fin_tokens = torch.full((rows, k, steps), PAD, dtype=torch.long, device=device)
        self.fin_scores = torch.full((rows, k), NEG_INF, device=device)
        self.sentence_rows = torch.arange(rows, device=device)[:, None] * k          # (rows, 1)

    def encode(self):
        enc, keep = self.model.encode(self.src)
        self.enc, self.keep = enc, additive_mask(keep)
        self.cache, self.kv = self.model.new_fixed_cache(
            len(self.tokens), self.steps, self.model.cross_keys_values(enc), self.at, self.visible)
        self.bound = length_penalty(self.max_len + 1, self.alpha)
        self.at.zero_()
        self.tokens.fill_(PAD)
        self.tokens[:, 0] = BOS
        self.scores.fill_(NEG_INF)
        # one live hypothesis at first
        self.scores[:, 0] = 0.0
        self.fin_tokens.fill_(PAD)
        self.fin_scores.fill_(NEG_INF)

    def decode_step(self):
        """beam_step's computation (see its docstring) on the fixed buffers."""
        n, k, steps = self.scores.size(0), self.k, self.steps
        self.see_written_positions()
        logits = self.model.ar_step(self.tokens.index_select(1, self.at).view(-1), self.at,
                                    self.enc, self.keep, self.cache).float()   # (n * k, vocab)
        log_norm = logits.logsumexp(dim=1, keepdim=True)
        logits = allow_only_eos(logits, (self.at >= self.max_len).repeat_interleave(k)[:, None])
        cand, origin, token = best_extensions(self.scores, logits, log_norm, 2 * k)   # (n, 2k)
        ends = token == EOS
        # The buffer holds PAD after the current step: the prefixes come out padded already.
        ended = self.tokens.view(n, k, -1)[:, :, 1:].gather(
            1, origin[..., None].expand(-1, -1, steps))
        ended_scores = (cand / self.penalty[self.at]).masked_fill(~ends, NEG_INF)
        fin_scores, pick = torch.cat([self.fin_scores, ended_scores], 1).topk(k, dim=1)
        fin_tokens = torch.cat([self.fin_tokens,
                                ended], 1).gather(1, pick[..., None].expand(-1, -1, steps))
        scores, pick = cand.masked_fill(ends, NEG_INF).topk(k, dim=1)
        rows = (origin.gather(1, pick) + self.sentence_rows).view(-1)    # (n * k,)
        tokens = self.tokens.index_select(0, rows)
        tokens.index_copy_(1, self.at + 1, token.gather(1, pick).view(-1, 1))
        done = scores[:, 0] / self.bound <= fin_scores[:, -1]
        self.tokens.copy_(tokens)
        self.scores.copy_(scores.masked_fill(done[:, None], NEG_INF))
        self.fin_tokens.copy_(fin_tokens)
        self.fin_scores.copy_(fin_scores)
        self.kv.copy_(self.kv.index_select(2, rows))                     # every layer's cache rows
        self.at += 1
        self.live.copy_((self.scores[:, 0] > NEG_INF).any())


class NarSession:
    """nar_decode on fixed buffers: one graph for the encoder and the length window, then (after one
    host sync that reads the longest candidate length) one graph per bucket of output lengths."""

    def __init__(self, model, rows, src_len, length_beam, odd, rescorer, alpha, oracle):
        device = model.embed.weight.device
        self.model, self.length_beam, self.odd, self.rescorer, self.alpha = (
            model, length_beam, odd, rescorer, alpha)
        self.src = torch.full((rows, src_len), PAD, dtype=torch.long, device=device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=device) if oracle else None
        self.start = Graphed(self.candidates, device)
        self.decoders, self.device = {}, device

    def candidates(self):
        self.enc, self.keep, self.len_logp, self.cand_len = length_candidates(
            self.model, self.src, self.length_beam, self.lengths)
        return self.cand_len

    def decode(self, out_len):
        if out_len not in self.decoders:
            self.decoders[out_len] = Graphed(lambda: decode_lengths(
                self.model, self.src, self.enc, self.keep, self.len_logp, self.cand_len, self.odd,
                self.rescorer, self.alpha, out_len), self.device)
        return self.decoders[out_len]()


class FastDecoder:
    """The fast path of one model: its sessions (buffers and graphs), one per shape bucket, the most
    recently used kept."""

    def __init__(self, model):
        self.model, self.sessions = model, OrderedDict()

    def session(self, key, make):
        # The weights' address too: a model moved to another device needs new buffers and graphs.
        key = key + (self.model.embed.weight.data_ptr(),)
        if key not in self.sessions:
            if len(self.sessions) >= MAX_SESSIONS:
                self.sessions.popitem(last=False)
            self.sessions[key] = make()
        self.sessions.move_to_end(key)
        return self.sessions[key]

    def src_bucket(self, src):
        return min(round_up(src.size(1)), self.model.cfg.max_len)

    def load(self, session, src, max_len=None):
        session.src.fill_(PAD)
        session.src[:, :src.size(1)] = src
        if max_len is not None:
            session.max_len.copy_(max_len)

    def run(self, session, steps):
        """start(), then up to `steps` steps, asking every EARLY_STOP_EVERY steps whether any
        sentence is still searching (one host sync)."""
        session.start()
        for step in range(steps):
            session.step()
            if (step + 1) % EARLY_STOP_EVERY == 0 and not session.searching():
                break

    def greedy(self, src, max_len=None):
        model = self.model
        max_len = max_output_len(src, model) if max_len is None else max_len
        steps = int(max_len.max()) + 1                                    # host sync, as ar_greedy
        key = ("greedy", len(src), self.src_bucket(src), self.steps_bucket(steps),
               autocast_state(src.device.type))
        session = self.session(key, lambda: self.prepared(GreedySession(
            model, len(src), key[2], key[3]), src, max_len))
        self.load(session, src, max_len)
        self.run(session, steps)
        tokens = session.out[:, :steps]
        return tokens.masked_fill(tokens == EOS, PAD)

    def beam_search(self, src, beam=5, alpha=1.0, nbest=1, max_len=None):
        if not 1 <= nbest <= beam:
            raise ValueError(f"nbest must be between 1 and the beam size {beam}, not {nbest}")
        model = self.model
        max_len = max_output_len(src, model) if max_len is None else max_len.to(src.device)
        steps = int(max_len.max()) + 1
        key = ("beam", len(src), self.src_bucket(src), self.steps_bucket(steps), beam, alpha,
               autocast_state(src.device.type))
        session = self.session(key, lambda: self.prepared(BeamSession(
            model, len(src), key[2], key[3], beam, alpha), src, max_len))
        self.load(session, src, max_len)
        self.run(session, steps)
        return session.fin_tokens[:, :nbest, :steps].clone(), session.fin_scores[:, :nbest].clone()

    def nar_decode(self, src, length_beam=1, odd=True, rescorer=None, alpha=1.0, lengths=None):
        model = self.model
        key = ("nar", len(src), self.src_bucket(src), length_beam, odd, id(rescorer), alpha,
               lengths is not None, autocast_state(src.device.type))
        session = self.session(key, lambda: NarSession(model, len(src), key[2], length_beam, odd,
                                                       rescorer, alpha, lengths is not None))
        self.load(session, src)
        if lengths is not None:
            session.lengths.copy_(lengths)
        longest = int(session.start().max())                             # host sync
        return session.decode(min(round_up(longest), model.cfg.max_len)).clone()

    def steps_bucket(self, steps):
        return min(round_up(steps), self.model.cfg.max_len + 1)

    def prepared(self, session, src, max_len):
        """A new session with its graphs recorded (recording runs the step: the next start()
        resets what it changed)."""
        self.load(session, src, max_len)
        session.start()
        session.step()
        return session


def decoders(device):
    """(greedy, beam search, NAR decoding) for a device: the fast path's where it pays
    (use_fast_path), else the reference decoders. Same arguments, same results."""
    return DECODERS_FAST if use_fast_path(device) else (ar_greedy, ar_beam_search, nar_decode)


def release_fast_path(model):
    """Free the fast path's buffers and graphs of a model (they hold GPU memory)."""
    if getattr(model, "fast_decoder", None) is not None:
        model.fast_decoder.sessions.clear()


def fast_decoder(model):
    """The model's FastDecoder (made at the first call, kept on the model)."""
    if getattr(model, "fast_decoder", None) is None:
        model.fast_decoder = FastDecoder(model)
    return model.fast_decoder


@torch.no_grad()
def fast_greedy(model, src, max_len=None):
    """ar_greedy on the fast path: the same tokens."""
    return fast_decoder(model).greedy(src, max_len)


@torch.no_grad()
def fast_beam_search(model, src, beam=5, alpha=1.0, nbest=1, max_len=None):
    """ar_beam_search on the fast path: the same tokens and scores."""
    return fast_decoder(model).beam_search(src, beam, alpha, nbest, max_len)


@torch.no_grad()
def fast_nar_decode(model, src, length_beam=1, odd=True, rescorer=None, alpha=1.0, lengths=None):
    """nar_decode on the fast path: the same tokens."""
    return fast_decoder(model).nar_decode(src, length_beam, odd, rescorer, alpha, lengths)


DECODERS_FAST = (fast_greedy, fast_beam_search, fast_nar_decode)


# ------------------------------------------------------------------------------------------------
# Whole corpora
# ------------------------------------------------------------------------------------------------
def tokens_to_lists(tokens):
    """(batch, len) PAD-padded ids -> list of id lists, one host transfer for the whole batch."""
    return [[i for i in row if i != PAD] for row in tokens.tolist()]


def decode_corpus(model, sources, decode_batch, rows_per_source, max_tokens, device, progress, desc,
                  precision="fp32"):
    """Run decode_batch(src) -> one result per sentence over a list of source id lists, batched by a
    token budget (rows_per_source rows a sentence), and return the results in the order of
    `sources`.
    The model is put in eval mode (no dropout); precision "bf16": under bf16 autocast."""
    batches = make_batches([len(s) for s in sources], max(max_tokens // rows_per_source, 1))
    results = [None] * len(sources)
    model.eval()
    release_fast_path(model)          # buffers of earlier shapes: the memory goes to this corpus
    bar = progress_bar(total=len(sources), desc=desc, disable=not progress)
    with precision_context(device, precision):
        for batch in batches:
            outs = decode_batch(pad_batch([sources[i] for i in batch], device))
            for i, out in zip(batch, outs):
                results[i] = out
            bar.update(len(batch))
    bar.close()
    release_fast_path(model)
    return results


@torch.no_grad()
def translate_ids(model, sources, method="beam", beam=5, alpha=1.0, length_beam=1, odd=True,
                  rescorer=None, max_tokens=4096, device="cpu", progress=False, precision="fp32"):
    """One translation (a list of ids) per source id list. method: "greedy" | "beam" (AR) |
    "nar"."""
    if rescorer is not None:
        rescorer.eval()
    greedy, beam_search, nar = decoders(device)
    if method == "greedy":
        fn, rows = (lambda src: tokens_to_lists(greedy(model, src))), 1
    elif method == "beam":
        fn, rows = (lambda src: tokens_to_lists(beam_search(model, src, beam=beam,
                                                            alpha=alpha)[0][:, 0])), beam
    elif method == "nar":
        fn, rows = (lambda src: tokens_to_lists(nar(model, src, length_beam=length_beam, odd=odd,
                                                    rescorer=rescorer, alpha=alpha))), length_beam
    else:
        raise ValueError(f"unknown decoding method {method!r}")
    return decode_corpus(model, sources, fn, rows, max_tokens, device, progress,
                         f"decode ({method})", precision)


@dataclass
class NBest:
    """N-best lists of many sources in flat arrays. As Python lists of ints a token id costs ~45
    bytes (a list slot, an int object), here 4 (int32): what keeps the E-step's 20 candidates of
    every training source in memory at WMT scale. Candidate j of source i is tokens[offsets[i*n+j] :
    offsets[i*n+j+1]]."""
    n: int                        # candidates per source
    tokens: np.ndarray            # int32, every candidate's ids, one after the other
    offsets: np.ndarray           # int64 (sources * n + 1,)
    # float32 (sources, n): length-normalised, best first; -inf: no hypothesis
    scores: np.ndarray

    def __len__(self):
        return len(self.scores)

    def candidates(self, i):
        """Source i's n candidates, as id lists."""
        bounds = self.offsets[i * self.n:(i + 1) * self.n + 1].tolist()
        return [self.tokens[a:b].tolist() for a, b in zip(bounds, bounds[1:])]

    def lists(self):
        """(a list of n id lists per source, a list of n scores per source)."""
        return [self.candidates(i) for i in range(len(self))], self.scores.tolist()

    @classmethod
    def from_rows(cls, n, rows):
        """From one (tokens (n, len) PAD-padded, scores (n,)) pair of arrays per source."""
        lengths = np.array([(t != PAD).sum(1) for t, _ in rows], dtype=np.int64).reshape(-1)
        tokens = np.concatenate([t[t != PAD] for t, _ in rows] or [np.zeros(0)]).astype(np.int32)
        scores = np.array([s for _, s in rows], dtype=np.float32).reshape(-1, n)
        return cls(n, tokens, np.concatenate([[0], np.cumsum(lengths)]), scores)

    @classmethod
    def from_lists(cls, n, candidates, scores):
        flat = [c for cands in candidates for c in cands]
        lengths = np.array([len(c) for c in flat], dtype=np.int64)
        tokens = np.array([i for c in flat for i in c], dtype=np.int32)
        return cls(n, tokens, np.concatenate([[0], np.cumsum(lengths)]),
                   np.array(scores, dtype=np.float32).reshape(-1, n))

    @classmethod
    def interleave(cls, parts):
        """The N-best of every source from the shards of several processes (train.shard gives
        process r the sources r, r + world, ...), in the sources' order."""
        if len(parts) == 1:
            return parts[0]
        n, world = parts[0].n, len(parts)
        order = [(i % world, i // world) for i in range(sum(map(len, parts)))]
        rows = []
        for r, j in order:
            part = parts[r]
            bounds = part.offsets[j * n:(j + 1) * n + 1]
            rows.append((part.tokens[bounds[0]:bounds[-1]], np.diff(bounds), part.scores[j]))
        tokens = np.concatenate([t for t, _, _ in rows]
                                or [np.zeros(0, dtype=np.int32)]).astype(np.int32)
        lengths = np.concatenate([l for _, l, _ in rows] or [np.zeros(0, dtype=np.int64)])
        return cls(n, tokens, np.concatenate([[0], np.cumsum(lengths)]),
                   np.stack([s for _, _, s in rows]))


@torch.no_grad()
def nbest(model, sources, n, alpha=1.0, max_tokens=4096, device="cpu", progress=False,
          precision="fp32"):
    """The n best beam-search translations (beam n) of every source, best first, with their
    length-normalised scores, as an NBest. The E-step draws Q from these."""
    beam_search = decoders(device)[1]

    def fn(src):
        # (batch, n, out_len)
        tokens, scores = beam_search(model, src, beam=n, alpha=alpha, nbest=n)
        # one transfer
        tokens, scores = tokens.cpu().numpy().astype(np.int32), scores.float().cpu().numpy()
        return list(zip(tokens, scores))
    return NBest.from_rows(n, decode_corpus(model, sources, fn, n, max_tokens, device, progress,
                                            f"{n}-best", precision))


def nbest_ids(model, sources, n, **options):
    """nbest as Python lists: (n id lists per source, n scores per source). For small inputs."""
    return nbest(model, sources, n, **options).lists()


@torch.no_grad()
def score_pairs(model, pairs, max_tokens=4096, device="cpu", precision="fp32"):
    """Sentence log-likelihoods model.score(x, y) of (source ids, target ids) pairs, a list of
    floats in the order of `pairs`, batched by a token budget. The model is put in eval mode: a
    score with dropout on is a noisy score (the E-step compares scores across candidates). This one
    scorer serves the E-step's selection, its printed example, the NLL column and the margin
    study."""
    model.eval()
    scores = [0.0] * len(pairs)
    with precision_context(device, precision):
        for batch in make_batches([max(len(s), len(t)) for s, t in pairs], max_tokens):
            src = pad_batch([pairs[j][0] for j in batch], device)
            tgt = pad_batch([pairs[j][1] for j in batch], device)
            for j, score in zip(batch, model.score(src, tgt).tolist()):
                scores[j] = score
    return scores


# ------------------------------------------------------------------------------------------------
# Text and BLEU
# ------------------------------------------------------------------------------------------------
ESCAPES = {"&apos;": "'", "&quot;": '"', "&amp;": "&", "&lt;": "<", "&gt;": ">", "&#91;": "[",
           "&#93;": "]", "&#124;": "|"}


NO_SPACE_BEFORE = {".", ",", "!", "?", ";", ":", "%", ")", "]", "}", "n't", "'s", "'re", "'ve",
                   "'ll", "'d", "'m", "'t"}
NO_SPACE_AFTER = {"(", "[", "{", "$"}


def detokenize(text):
    """Undo Moses-style English tokenisation well enough for sacreBLEU: unescape entities and glue
    punctuation, clitics and quotes back ("he said &quot; it &apos;s fine . &quot;" ->
    'he said "it's fine."')."""
    for escaped, char in ESCAPES.items():
        text = text.replace(escaped, char)
    words, glue_next, quote_open = [], False, False
    for tok in text.split():
        closing_quote = tok == '"' and quote_open
        glue = words and (glue_next or tok in NO_SPACE_BEFORE or closing_quote)
        glue_next = tok in NO_SPACE_AFTER or (tok == '"' and not quote_open)
        quote_open ^= tok == '"'
        if glue:
            words[-1] += tok
        else:
            words.append(tok)
    return " ".join(words)


def bleu(hypotheses, references, tokenized=True):
    """Corpus BLEU. references: list of reference lists (one list per reference set).
    tokenized=True: 'tokenised BLEU' on the text as it is (tokenize='none'), the figure NAT papers
    report; tokenized=False: sacreBLEU's 13a BLEU on em-nat's detokenisation of output and
    references (lowercased when every reference is, so that the signature says what was computed).
    Returns (score, signature)."""
    if tokenized:
        # force=True: the text is tokenised on purpose here, so sacreBLEU's "forgot to detokenize?"
        # warning does not apply.
        metric = sacrebleu.BLEU(tokenize="none", force=True)
        result = metric.corpus_score(hypotheses, references)
    else:
        lowercased = all(r == r.lower() for refs in references for r in refs)
        metric = sacrebleu.BLEU(lowercase=lowercased)
        result = metric.corpus_score([detokenize(h) for h in hypotheses],
                                     [[detokenize(r) for r in refs] for refs in references])
    return result.score, str(metric.get_signature())


SENTENCE_BLEU = sacrebleu.BLEU(tokenize="none", effective_order=True, force=True)


def sentence_bleu(hypothesis, reference):
    """Tokenised BLEU of one sentence against one reference (effective n-gram order, so a short
    sentence is not zero by construction)."""
    return SENTENCE_BLEU.sentence_score(hypothesis, [reference]).score


def ids_to_text(ids, vocab, is_bpe):
    text = " ".join(vocab.decode(ids))
    return remove_bpe(text) if is_bpe else text


# ------------------------------------------------------------------------------------------------
# Command line: translate, or benchmark latency
# ------------------------------------------------------------------------------------------------
def load_translator(directory, device):
    """A checkpoint directory -> (model, config dict, vocab, bpe or None)."""
    model, config = load_checkpoint(directory, device)
    vocab = Vocab.load(os.path.join(directory, "vocab.txt"))
    if len(vocab) != model.cfg.vocab_size:
        raise CheckpointError(f"{directory}/vocab.txt has {len(vocab)} entries but the model was "
                              f"built for {model.cfg.vocab_size}: the vocabulary does not belong "
                              f"to this checkpoint")
    bpe_path = os.path.join(directory, "bpe.codes")
    return model, config, vocab, BPE.load(bpe_path) if os.path.isfile(bpe_path) else None


def load_rescorer(directory, vocab, device):
    """The AR model of `directory` for NPD rescoring; it must share the NAR model's vocabulary."""
    rescorer, config, rescorer_vocab, _ = load_translator(directory, device)
    if config["model"]["kind"] != "ar":
        raise CheckpointError(f"{directory}: --rescore-with needs an AR checkpoint, this one is "
                              f"{config['model']['kind']}")
    if rescorer_vocab.itos != vocab.itos:
        raise CheckpointError(f"{directory}/vocab.txt: differs from the vocabulary of "
                              f"--checkpoint; the rescorer must come from the same run")
    return rescorer


def encode_lines(lines, vocab, bpe, max_len, warn=None):
    """Source id lists of text lines, tokenised as the training data (BPE-encoded with the run's BPE
    where em-nat learned one), cut to the model's max_len. warn(line number, unknown words): called
    for every line with words outside the vocabulary, which become <unk> (the translation is then a
    guess)."""
    sources = []
    for number, line in enumerate(lines, start=1):
        words = line.split()
        pieces = bpe.encode(words) if bpe is not None else words
        ids = vocab.encode(pieces)
        if warn is not None and UNK in ids:
            warn(number, sorted({p for p, i in zip(pieces, ids) if i == UNK}))
        sources.append(ids[:max_len])
    return sources


def translate_lines(lines, model, vocab, bpe, is_bpe, beam=5, alpha=1.0, length_beam=1, odd=True,
                    rescorer=None, device="cpu", precision="fp32", warn=None):
    """One output line per input line; empty or over-long input lines are handled, never dropped."""
    sources = encode_lines(lines, vocab, bpe, model.cfg.max_len, warn)
    nonempty = [i for i, s in enumerate(sources) if s]
    method = "nar" if model.cfg.kind == "nar" else ("greedy" if beam == 1 else "beam")
    outs = translate_ids(model, [sources[i] for i in nonempty], method=method, beam=beam,
                         alpha=alpha, length_beam=length_beam, odd=odd, rescorer=rescorer,
                         device=device, progress=len(nonempty) > 50, precision=precision)
    text = [""] * len(lines)
    for i, out in zip(nonempty, outs):
        text[i] = ids_to_text(out, vocab, is_bpe)
    return text


def benchmark(args, device):
    """Latency of AR (greedy, beam) vs NAR (ODD with one length, length beam + AR rescoring) on the
    same sentences in one run, with random weights: the AR model is kept from ending early (its
    <eos> logit is pushed down until the forced end) and the NAR model is given the same output
    length, so both produce exactly --tgt-len tokens and the comparison is like for like. Each
    system runs on the reference decoders and on the fast path (fixed shapes; CUDA graphs on a GPU),
    side by side; "vs beam" divides the fastest AR beam time by the system's. launches/sent: kernel
    launches per sentence (ATen operations that compute, and CUDA graph replays), counted on one
    batch."""
    torch.manual_seed(0)
    vocab_size = 10000
    ar = Transformer(model_config(args.preset, vocab_size, "ar", dropout=0.0)).to(device).eval()
    nar = Transformer(model_config(args.preset, vocab_size, "nar", dropout=0.0)).to(device).eval()
    with torch.no_grad():
        ar.out_bias[EOS] = -1e4
    n, src_len, tgt_len = args.sentences, args.src_len, args.tgt_len
    src = torch.randint(4, vocab_size, (n, src_len), device=device)
    fixed = torch.full((n,), tgt_len, device=device)     # AR: tgt_len tokens, then the forced <eos>
    print(f"benchmark: preset {args.preset}, random weights, device {device} ({args.precision}), "
          f"attention {args.attention}, {n} sentences, {src_len} source -> {tgt_len} target "
          f"tokens, {torch.get_num_threads()} threads, torch {torch.__version__}")
    table = []
    with precision_context(device, args.precision), attention_backend(args.attention):
        for batch_size in (1, args.batch_size):
            times = {}
            for path, (greedy, beam_search, nar_pass) in (("reference", decoders("cpu")),
                                                          ("fast", DECODERS_FAST)):
                systems = latency_systems(ar, nar, fixed, args, greedy, beam_search, nar_pass)
                for name, fn in progress_bar(systems.items(), desc=f"batch {batch_size}, {path}"):
                    times[name, path] = (time_per_batch(fn, src, batch_size, device),
                                         launches_per_sentence(fn, src[:batch_size]))
            fastest_beam = min(ms for (name, _), (ms, _) in times.items()
                               if name.startswith("AR beam"))
            for (name, path), (ms, launches) in times.items():
                table.append((batch_size, name, path, ms, ms / tgt_len, fastest_beam / ms,
                              launches))
    print(f"\n{'batch':>5}  {'system':<34} {'path':<9} {'ms/sent':>8} {'ms/token':>8} "
          f"{'vs beam':>8} {'launches/sent':>13}")
    for batch_size, name, path, ms, per_token, vs_beam, launches in table:
        print(f"{batch_size:>5}  {name:<34} {path:<9} {ms:>8.2f} {per_token:>8.3f} "
              f"{vs_beam:>7.1f}x {launches:>13.0f}")
    return table


def latency_systems(ar, nar, fixed, args, greedy, beam_search, nar_pass):
    """The four systems the benchmark times, each a function of a source batch."""
    return {
        "AR greedy": lambda s: greedy(ar, s, max_len=fixed[:len(s)]),
        f"AR beam {args.beam}": lambda s: beam_search(ar, s, beam=args.beam, alpha=args.alpha,
                                                      max_len=fixed[:len(s)]),
        "NAR ODD (1 length)": lambda s: nar_pass(nar, s, lengths=fixed[:len(s)]),
        "NAR ODD + AR rescoring (9 lengths)": lambda s: nar_pass(   # the paper's length beam B = 9
            nar, s, length_beam=9, rescorer=ar, alpha=args.alpha, lengths=fixed[:len(s)]),
    }


def time_per_batch(fn, src, batch_size, device):
    """Milliseconds per sentence of fn over src in batches of batch_size, after two warm-up batches
    (which also record the fast path's graphs)."""
    n = len(src)
    for i in range(0, min(batch_size * 2, n), batch_size):
        fn(src[i:i + batch_size])
    synchronize(device)
    start = time.perf_counter()
    for i in range(0, n, batch_size):
        fn(src[i:i + batch_size])
    synchronize(device)
    return (time.perf_counter() - start) * 1000 / n


def launches_per_sentence(fn, src):
    """Kernel launches per sentence of one call of fn on the batch src (model.Counts)."""
    with Counts() as counts:
        fn(src)
    return counts.launches / len(src)


def build_parser():
    p = argparse.ArgumentParser(
        description="Translate with an em-nat checkpoint (AR or NAR), or benchmark decoding "
                    "latency.\n"
                    "The input must be tokenised as the training data was (em-nat applies "
                    "the run's BPE\n"
                    "itself where it learned one); words outside the vocabulary are reported on "
                    "stderr.",
        epilog="examples:\n"
               "  echo 'ka lu mo' | python decode.py --checkpoint runs/toy-toy/em2-nar\n"
               "  python decode.py --checkpoint runs/toy-toy/em2-nar "
               "--rescore-with runs/toy-toy/em2-ar "
               "--length-beam 9 --input src.txt\n"
               "  python decode.py --benchmark --preset iwslt",
        formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", help="a stage directory of a run, e.g. runs/toy-toy/em2-nar")
    p.add_argument("--input", help="text file, one sentence per line (default: standard input)")
    p.add_argument("--output", help="write translations here (default: standard output)")
    p.add_argument("--beam", type=int, default=5, help="AR beam size (1 = greedy)")
    p.add_argument("--alpha", type=float, help="length penalty exponent (default: the one the "
                                               "checkpoint's run used; 1.0 for the benchmark; the "
                                               "paper: 1.4 on IWSLT14)")
    p.add_argument("--length-beam", type=int, default=1,
                   help="NAR: number of length candidates (paper: 1 or 9)")
    p.add_argument("--no-odd", action="store_true",
                   help="NAR: plain argmax instead of ODD decoding")
    p.add_argument("--rescore-with",
                   help="NAR: AR checkpoint directory that rescores the length candidates (NPD)")
    p.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on a GPU with native bf16 (compute capability 8.0+), "
                        "else fp32")
    b = p.add_argument_group("benchmark (random weights; no checkpoint needed)")
    b.add_argument("--benchmark", action="store_true",
                   help="measure AR vs NAR latency and print a table")
    b.add_argument("--preset", choices=sorted(PRESETS), default="iwslt", help="model size to time")
    b.add_argument("--sentences", type=int, default=64,
                   help="sentences timed per system and batch size")
    b.add_argument("--src-len", type=int, default=25, help="source length in tokens")
    b.add_argument("--tgt-len", type=int, default=25, help="output length in tokens")
    b.add_argument("--batch-size", type=int, default=64,
                   help="the large batch size timed besides 1")
    b.add_argument("--attention", choices=ATTENTION_BACKENDS, default="auto",
                   help="the attention kernel to time (auto: PyTorch's choice per call)")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = pick_device(check_device(args.device))
        args.precision = resolve_precision(args.precision, device)
    except ValueError as err:
        parser.error(str(err))
    keep_freed_memory_on_cpu()
    if args.benchmark:
        args.alpha = 1.0 if args.alpha is None else args.alpha
        benchmark(args, device)
        return
    if not args.checkpoint:
        sys.exit("decode.py: give --checkpoint DIR (a stage directory of a run), or --benchmark")
    try:
        model, config, vocab, bpe = load_translator(args.checkpoint, device)
        rescorer = load_rescorer(args.rescore_with, vocab, device) if args.rescore_with else None
        lines = read_lines(args.input) if args.input else sys.stdin.read().splitlines()
    except (CheckpointError, DataError) as err:
        sys.exit(f"decode.py: {err}")
    source = args.input or "<stdin>"

    def warn(number, unknown):
        print(f"decode.py: {source}:{number}: {len(unknown)} unknown word(s) become <unk>: "
              f"{' '.join(unknown[:10])}"
              f"{' ...' if len(unknown) > 10 else ''}", file=sys.stderr)

    text = translate_lines(lines, model, vocab, bpe, config.get("is_bpe", False), beam=args.beam,
                           alpha=config.get("alpha", 1.0) if args.alpha is None else args.alpha,
                           length_beam=args.length_beam, odd=not args.no_odd, rescorer=rescorer,
                           device=device, precision=args.precision, warn=warn)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    out.write("".join(line + "\n" for line in text))
    if args.output:
        out.close()


if __name__ == "__main__":
    main()
