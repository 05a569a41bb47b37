"""decode.py: everything that turns a trained model into text (the paper's decoding: docs/method.md).

- AR: greedy search, and beam search with a finished set (as GNMT, fairseq and the official
  beamsearch.py do): each step the 2k best extensions of the k live hypotheses are taken; those ending
  in <eos> join the sentence's finished set, ranked by the GNMT length-normalised score
  log p / ((5 + |y|) / 6)^alpha; the k best others stay live; a sentence stops when no live hypothesis
  can still beat its k-th finished one (exact). N-best lists = the N best finished (the E-step asks for
  N = 20 candidates per training source). The beams of a sentence share its encoder states, and a
  sentence leaves the batch once its search is done.
- NAR: the predicted length, or the official window of B lengths around it, all decoded in one batched
  pass; argmax or ODD (optimal de-duplicated) decoding: the best sequence of that length with no two
  equal neighbours, by Viterbi over the top-3 tokens of each position, batched on the model's device.
- NPD rescoring: the AR model scores every length candidate in one teacher-forced pass (float32).
- Decoders never emit <pad>, <bos> or <unk> (nor <eos> for the NAR model); scoring a given target
  masks nothing.
- BLEU with sacreBLEU, and a command-line translator and latency benchmark:

    python decode.py --checkpoint runs/toy-toy/em2-nar --input source.txt
    python decode.py --checkpoint runs/toy-toy/em2-nar --rescore-with runs/toy-toy/em2-ar --length-beam 5
    python decode.py --benchmark --preset iwslt

Hot loops (beam steps, Viterbi steps) are tensor work with no host synchronisation, except the beam
search's "which sentences are done?" test, which runs every EARLY_STOP_EVERY steps.
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import sacrebleu
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import BPE, DataError, Vocab, make_batches, pad_batch, read_lines, remove_bpe
from model import (EOS, PAD, BOS, UNK, CheckpointError, Transformer, keep_freed_memory_on_cpu, load_checkpoint,
                   model_config, pick_device, precision_context, resolve_precision, synchronize)

EARLY_STOP_EVERY = 4          # beam steps between "are all beams finished?" host checks
OUTPUT_RATIO, OUTPUT_EXTRA = 1, 20      # an AR output holds at most |x| + 20 tokens, as in the official code
NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------
# AR decoding
# ------------------------------------------------------------------------------------------------
def length_penalty(lengths, alpha):
    """GNMT length penalty ((5 + len) / 6)^alpha, len counting the final <eos>; a hypothesis is ranked
    by its log-probability divided by it. alpha = 0 ranks by raw log-probability. lengths: a tensor
    or an int."""
    return ((5.0 + lengths) / 6.0) ** alpha


def max_output_len(src, model):
    """Most output tokens (not counting <eos>) allowed per sentence: OUTPUT_RATIO * |x| + OUTPUT_EXTRA,
    capped by the model's max_len: (batch,). At that length the AR model is forced to end."""
    src_len = (src != PAD).sum(1)
    return (OUTPUT_RATIO * src_len + OUTPUT_EXTRA).long().clamp(max=model.cfg.max_len)


def allow_only_eos(logp, at_limit):
    """Where at_limit (rows, 1) is true, every token but <eos> is forbidden: the output has reached its
    maximum length. logp: (rows, vocab)."""
    not_eos = torch.arange(logp.size(-1), device=logp.device) != EOS
    return logp.masked_fill(at_limit & not_eos, NEG_INF)


@torch.no_grad()
def ar_greedy(model, src, max_len=None):
    """Greedy AR decoding. src: (batch, src_len) -> tokens (batch, out_len), PAD after the end.
    An output holds at most max_len tokens (then <eos> is forced)."""
    max_len = max_output_len(src, model) if max_len is None else max_len
    enc, keep = model.encode(src)
    cache, steps = model.new_cache(), int(max_len.max()) + 1
    token = src.new_full((src.size(0),), BOS)
    finished = torch.zeros_like(token, dtype=torch.bool)
    out = []
    for step in range(steps):
        logits = model.ar_step(token, step, enc, keep, cache).float()     # (batch, vocab)
        token = allow_only_eos(logits, (step >= max_len)[:, None]).argmax(-1)   # the most likely token
        token = token.masked_fill(finished, PAD)
        out.append(token)
        finished |= token == EOS
        if (step + 1) % EARLY_STOP_EVERY == 0 and bool(finished.all()):
            break
    tokens = torch.stack(out, 1)                                          # (batch, steps)
    return tokens.masked_fill(tokens == EOS, PAD)


@dataclass
class BeamState:
    """The beam search of the sentences still searching. Row i of every per-sentence tensor belongs to
    sentence `index[i]` of the batch; hypothesis rows are grouped by sentence, `beam` rows each."""
    index: torch.Tensor        # (n,) positions in the batch
    max_len: torch.Tensor      # (n,) most output tokens allowed
    shortest_limit: int        # min(max_len), on the host: before that step no output is forced to end
    bound: torch.Tensor        # (n,) length penalty of the longest allowed output: the stop test's
    tokens: torch.Tensor       # (n * beam, 1 + step) live hypotheses, <bos> first
    scores: torch.Tensor       # (n, beam) their raw log-probabilities (-inf: no hypothesis)
    fin_tokens: torch.Tensor   # (n, beam, steps) the best finished hypotheses, without <eos>
    fin_scores: torch.Tensor   # (n, beam) their length-normalised scores, best first

    def keep(self, rows, beam):
        """Only the sentences `rows` (n',) go on searching."""
        hyp_rows = (rows[:, None] * beam + torch.arange(beam, device=rows.device)).view(-1)
        max_len = self.max_len[rows]
        return BeamState(self.index[rows], max_len, int(max_len.min()), self.bound[rows], self.tokens[hyp_rows],
                         self.scores[rows], self.fin_tokens[rows], self.fin_scores[rows]), hyp_rows


def best_extensions(scores, logits, log_norm, width):
    """The `width` best one-token extensions of every sentence's live hypotheses, by raw log-probability.
    scores: (n, beam) raw log-probabilities of the live hypotheses; logits: (n * beam, vocab) their
    next-token logits, tokens never emitted at -inf; log_norm: (n * beam, 1) their log-sum-exp.
    Within one hypothesis log-probabilities rank like logits, so its `width` best tokens by logit hold
    all it can contribute: top-k per row, then top-k per sentence, and no (rows, vocab) log-softmax is
    written. Returns scores (n, width), the hypothesis each came from (n, width) and its token."""
    n, k = scores.shape
    per_row = min(width, logits.size(1))
    top_logit, top_token = logits.topk(per_row, dim=1)                    # (n * beam, per_row)
    logp = top_logit - log_norm                                            # log-softmax of the top few
    cand = (scores.view(-1, 1) + logp).view(n, k * per_row)
    cand, flat = cand.topk(width, dim=1)                                   # (n, width)
    return cand, flat // per_row, top_token.view(n, k * per_row).gather(1, flat)


def beam_step(state, logits, step, beam, alpha):
    """One step of beam search with a finished set (GNMT, fairseq, the official beamsearch.py), for every
    sentence at once (n sentences, k = beam hypotheses each). logits: (n * k, vocab) next-token logits of
    the live hypotheses, row i * k + j holding hypothesis j of sentence i, the tokens never emitted at
    -inf. Of the 2k best extensions by raw log-probability, those that end in <eos> join the sentence's
    finished set, ranked by their length-normalised score; the k best that do not end stay live.
    So a finished hypothesis never takes a live slot, and never competes on its raw log-probability.

    What ar_beam_search and the tests expect of it:
    - A token's log-probability is its logit minus the log-sum-exp of its row, taken over the row as
      given, before anything is forbidden. At a sentence's length limit (step >= state.max_len) only
      <eos> may follow (allow_only_eos), and that forced <eos> keeps its real log-probability (the
      same normaliser), not log 1 = 0. best_extensions finds the best extensions without a full
      log-softmax.
    - Finished set: fin_tokens (n, k, steps) holds each finished output without <bos> and <eos>,
      PAD-padded; fin_scores (n, k) its raw log-probability (the <eos> included) over
      length_penalty(step + 1, alpha), best first, -inf where the set holds fewer than k.
    - Live hypotheses: tokens (n * k, step + 2) are the parents' rows with the new token appended, scores
      (n, k) their raw log-probabilities, best first, -inf for an empty slot.
    - Stop test (exact): a sentence is done when its best live raw score over state.bound (its own
      length_penalty(max_len + 1)) is <= (equal too) its k-th finished score. A done sentence is
      signalled by all k of its live scores set to -inf: that is what ar_beam_search reads.
    - rows (n * k,): for each new live hypothesis, the row of logits (and of the model's cache) it
      extends, over the whole batch: sentence i's rows lie in i * k ... i * k + k - 1. ar_beam_search
      reorders the model's cache with them, so that every hypothesis goes on reading its own history.
    Returns the new state and rows."""
    # >>> exercise 6: beam search with a finished set
    n, k, steps = state.scores.size(0), beam, state.fin_tokens.size(2)
    log_norm = logits.logsumexp(dim=1, keepdim=True)                      # (n * beam, 1) softmax normaliser
    if step >= state.shortest_limit:                                       # a host int: no sync
        # At the length limit only <eos> may follow, with its real log-probability (same normaliser).
        logits = allow_only_eos(logits, (step >= state.max_len).repeat_interleave(k)[:, None])
    cand, origin, token = best_extensions(state.scores, logits, log_norm, 2 * k)   # (n, 2k) each
    ends = token == EOS
    # Ended extensions: their prefix (without <bos>) and normalised score, merged into the finished set.
    prefix = state.tokens.view(n, k, -1)[:, :, 1:].gather(1, origin[..., None].expand(-1, -1, step))
    ended = F.pad(prefix, (0, steps - step), value=PAD)                    # (n, 2k, steps)
    ended_scores = (cand / length_penalty(step + 1, alpha)).masked_fill(~ends, NEG_INF)
    fin_scores, pick = torch.cat([state.fin_scores, ended_scores], 1).topk(k, dim=1)   # (n, k)
    fin_tokens = torch.cat([state.fin_tokens, ended], 1).gather(1, pick[..., None].expand(-1, -1, steps))
    # Live: the k best extensions that do not end.
    scores, pick = cand.masked_fill(ends, NEG_INF).topk(k, dim=1)         # (n, k)
    rows = (origin.gather(1, pick) + torch.arange(n, device=origin.device)[:, None] * k).view(-1)
    tokens = torch.cat([state.tokens.index_select(0, rows), token.gather(1, pick).view(-1, 1)], dim=1)
    # Exact stop test: log-probabilities only fall as a hypothesis grows and the penalty grows with its
    # length, so no extension of a live hypothesis can score above (best live raw score) / (penalty of the
    # longest allowed output). Once that cannot beat the k-th finished score, the sentence is done.
    done = scores[:, 0] / state.bound <= fin_scores[:, -1]
    scores = scores.masked_fill(done[:, None], NEG_INF)
    return replace(state, tokens=tokens, scores=scores, fin_tokens=fin_tokens, fin_scores=fin_scores), rows
    # <<< exercise 6


@torch.no_grad()
def ar_beam_search(model, src, beam=5, alpha=1.0, nbest=1, max_len=None):
    """Batched beam search with a finished set. src: (batch, src_len); nbest <= beam.
    Returns tokens (batch, nbest, out_len) PAD-padded without <eos>, and their length-normalised scores
    log p(y <eos> | x) / length_penalty(|y| + 1) (batch, nbest), best first. An output holds at most
    max_len tokens (default max_output_len); a hypothesis that reaches it is forced to end, so every
    sentence gets `beam` finished hypotheses (when its output space holds that many).
    The beams of a sentence share one copy of its encoder states. Every EARLY_STOP_EVERY steps, one
    host sync asks which sentences are done; those leave the batch, so the work shrinks as they end.
    The last step allows only <eos>, so every search is done by then and has left the batch.
    After every beam_step the model's cache is reordered by the rows it returns (model.reorder_cache):
    the cache row of a hypothesis must hold its own prefix. A sentence is done when beam_step has set
    all its live scores to -inf."""
    if not 1 <= nbest <= beam:
        raise ValueError(f"nbest must be between 1 and the beam size {beam}, not {nbest}")
    b, k, device = src.size(0), beam, src.device
    max_len = max_output_len(src, model) if max_len is None else max_len.to(device)
    steps = int(max_len.max()) + 1                                         # host syncs before the loop
    enc, keep = model.encode(src)                                          # (batch, src_len+1, d), one per sentence
    cache = model.new_cache()
    scores = torch.full((b, k), NEG_INF, device=device)
    scores[:, 0] = 0.0                                                     # one live hypothesis at first
    state = BeamState(index=torch.arange(b, device=device), max_len=max_len, shortest_limit=int(max_len.min()),
                      bound=length_penalty(max_len + 1, alpha), tokens=src.new_full((b * k, 1), BOS),
                      scores=scores, fin_tokens=src.new_full((b, k, steps), PAD),
                      fin_scores=torch.full((b, k), NEG_INF, device=device))
    out_tokens, out_scores = src.new_full((b, k, steps), PAD), torch.full((b, k), NEG_INF, device=device)
    for step in range(steps):
        logits = model.ar_step(state.tokens[:, -1], step, enc, keep, cache).float()   # (n * beam, vocab)
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
    """ODD (optimal de-duplicated) decoding: argmax over y of sum_t logp[t, y_t] subject to y_t != y_{t-1},
    for each row of a batch, by Viterbi over the top-k tokens of every position.
    k = 3 is exact, not an approximation: a position has two neighbours, which forbid at most two
    tokens, so one of its top three is always allowed and at least as good as any token outside them.
    logp: (batch, t, vocab), the tokens never emitted at -inf (decoding_log_probs); lengths:
    (batch,), each row its own, from 1 to t (t may be 1). Returns tokens (batch, t), PAD after each
    row's length, and scores (batch,): the sum over the row's real positions only."""
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
    """The B = `beam` length candidates around the predicted lengths `center` (batch,), as the official
    code builds them: B consecutive lengths from max(L - floor(B/2), 1), shifted down where they would
    pass max_len, so there are always B distinct lengths (for B <= max_len). Every sentence of the
    batch gets the window around its own centre. -> (batch, beam) integer lengths."""
    # >>> exercise 5: the length window and NPD rescoring
    start = (center - beam // 2).clamp(min=1).clamp(max=max(max_len - beam + 1, 1))
    return (start[:, None] + torch.arange(beam, device=center.device)).clamp(max=max_len)
    # <<< exercise 5


def npd_scores(rescorer, src, tokens, lengths, alpha):
    """NPD (noisy parallel decoding): the AR model's score of each NAR candidate, log p_AR(y <eos> | x)
    over the length penalty of |y| + 1 (as beam search ranks finished outputs), in float32.
    src: (rows, src_len), one row per candidate; tokens: (rows, t) PAD-padded; lengths: (rows,).
    rescorer.score(src, tokens) gives log p_AR(y <eos> | x) of every row."""
    # >>> exercise 5: the length window and NPD rescoring
    return rescorer.score(src, tokens) / length_penalty(lengths + 1, alpha)
    # <<< exercise 5


@torch.no_grad()
def nar_decode(model, src, length_beam=1, odd=True, rescorer=None, alpha=1.0, lengths=None):
    """NAR decoding of a batch: the predicted length L (or the given `lengths`, for oracle-length
    analysis) and, for a length beam B, the window of B lengths around it (length_window), all decoded
    in one pass by ODD or argmax. Each candidate is scored by the NAR model (log p(T|x) + its tokens'
    log-probs) or, with an AR `rescorer`, by the AR log-likelihood over the length penalty (NPD, in
    float32); the best is kept. src: (batch, src_len) -> tokens (batch, out_len), PAD-padded."""
    b, beam = src.size(0), length_beam
    enc, keep = model.encode(src)
    len_logp = model.length_logits(enc).float().log_softmax(-1)           # (batch, max_len+1)
    len_logp[:, 0] = NEG_INF                                               # no empty outputs
    center = len_logp.argmax(-1) if lengths is None else lengths
    cand_len = length_window(center, beam, model.cfg.max_len)             # (batch, beam)
    flat_len = cand_len.view(-1)
    enc, keep = enc.repeat_interleave(beam, 0), keep.repeat_interleave(beam, 0)
    logp = model.decoding_log_probs(model.nar_logits(flat_len, enc, keep))   # (batch*beam, t, vocab)
    tokens, token_score = (odd_viterbi if odd else argmax_decode)(logp, flat_len)
    if rescorer is not None and beam > 1:
        score = npd_scores(rescorer, src.repeat_interleave(beam, 0), tokens, flat_len, alpha)
    else:
        score = len_logp.gather(1, cand_len).view(-1) + token_score
    best = score.view(b, beam).argmax(1)                                   # (batch,)
    return tokens.view(b, beam, -1)[torch.arange(b, device=src.device), best]


# ------------------------------------------------------------------------------------------------
# Whole corpora
# ------------------------------------------------------------------------------------------------
def tokens_to_lists(tokens):
    """(batch, len) PAD-padded ids -> list of id lists, one host transfer for the whole batch."""
    return [[i for i in row if i != PAD] for row in tokens.tolist()]


def decode_corpus(model, sources, decode_batch, rows_per_source, max_tokens, device, progress, desc,
                  precision="fp32"):
    """Run decode_batch(src) -> one result per sentence over a list of source id lists, batched by a
    token budget (rows_per_source rows a sentence), and return the results in the order of `sources`.
    The model is put in eval mode (no dropout); precision "bf16": under bf16 autocast."""
    batches = make_batches([len(s) for s in sources], max(max_tokens // rows_per_source, 1))
    results = [None] * len(sources)
    model.eval()
    bar = tqdm(total=len(sources), desc=desc, disable=not progress, leave=False)
    with precision_context(device, precision):
        for batch in batches:
            outs = decode_batch(pad_batch([sources[i] for i in batch], device))
            for i, out in zip(batch, outs):
                results[i] = out
            bar.update(len(batch))
    bar.close()
    return results


@torch.no_grad()
def translate_ids(model, sources, method="beam", beam=5, alpha=1.0, length_beam=1, odd=True,
                  rescorer=None, max_tokens=4096, device="cpu", progress=False, precision="fp32"):
    """One translation (a list of ids) per source id list. method: "greedy" | "beam" (AR) | "nar"."""
    if rescorer is not None:
        rescorer.eval()
    if method == "greedy":
        fn, rows = (lambda src: tokens_to_lists(ar_greedy(model, src))), 1
    elif method == "beam":
        fn, rows = (lambda src: tokens_to_lists(ar_beam_search(model, src, beam=beam, alpha=alpha)[0][:, 0])), beam
    elif method == "nar":
        fn, rows = (lambda src: tokens_to_lists(nar_decode(model, src, length_beam=length_beam, odd=odd,
                                                           rescorer=rescorer, alpha=alpha))), length_beam
    else:
        raise ValueError(f"unknown decoding method {method!r}")
    return decode_corpus(model, sources, fn, rows, max_tokens, device, progress, f"decode ({method})", precision)


@dataclass
class NBest:
    """N-best lists of many sources in flat arrays. As Python lists of ints a token id costs ~45 bytes
    (a list slot, an int object), here 4 (int32): what keeps the E-step's 20 candidates of every
    training source in memory at WMT scale. Candidate j of source i is tokens[offsets[i*n+j] :
    offsets[i*n+j+1]]."""
    n: int                        # candidates per source
    tokens: np.ndarray            # int32, every candidate's ids, one after the other
    offsets: np.ndarray           # int64 (sources * n + 1,)
    scores: np.ndarray            # float32 (sources, n): length-normalised, best first; -inf: no hypothesis

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
        return cls(n, tokens, np.concatenate([[0], np.cumsum(lengths)]), np.array(scores, dtype=np.float32).reshape(-1, n))

    @classmethod
    def interleave(cls, parts):
        """The N-best of every source from the shards of several processes (train.shard gives process
        r the sources r, r + world, ...), in the sources' order."""
        if len(parts) == 1:
            return parts[0]
        n, world = parts[0].n, len(parts)
        order = [(i % world, i // world) for i in range(sum(map(len, parts)))]
        rows = []
        for r, j in order:
            part = parts[r]
            bounds = part.offsets[j * n:(j + 1) * n + 1]
            rows.append((part.tokens[bounds[0]:bounds[-1]], np.diff(bounds), part.scores[j]))
        tokens = np.concatenate([t for t, _, _ in rows] or [np.zeros(0, dtype=np.int32)]).astype(np.int32)
        lengths = np.concatenate([l for _, l, _ in rows] or [np.zeros(0, dtype=np.int64)])
        return cls(n, tokens, np.concatenate([[0], np.cumsum(lengths)]), np.stack([s for _, _, s in rows]))


@torch.no_grad()
def nbest(model, sources, n, alpha=1.0, max_tokens=4096, device="cpu", progress=False, precision="fp32"):
    """The n best beam-search translations (beam n) of every source, best first, with their
    length-normalised scores, as an NBest. The E-step draws Q from these."""
    def fn(src):
        tokens, scores = ar_beam_search(model, src, beam=n, alpha=alpha, nbest=n)   # (batch, n, out_len)
        tokens, scores = tokens.cpu().numpy().astype(np.int32), scores.float().cpu().numpy()   # one transfer
        return list(zip(tokens, scores))
    return NBest.from_rows(n, decode_corpus(model, sources, fn, n, max_tokens, device, progress, f"{n}-best",
                                            precision))


def nbest_ids(model, sources, n, **options):
    """nbest as Python lists: (n id lists per source, n scores per source). For small inputs."""
    return nbest(model, sources, n, **options).lists()


@torch.no_grad()
def score_pairs(model, pairs, max_tokens=4096, device="cpu", precision="fp32"):
    """Sentence log-likelihoods model.score(x, y) of (source ids, target ids) pairs, a list of floats in
    the order of `pairs`, batched by a token budget. The model is put in eval mode: a score with
    dropout on is a noisy score (the E-step compares scores across candidates). This one scorer serves
    the E-step's selection, its printed example, the NLL column and the margin study."""
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
ESCAPES = {"&apos;": "'", "&quot;": '"', "&amp;": "&", "&lt;": "<", "&gt;": ">", "&#91;": "[", "&#93;": "]",
           "&#124;": "|"}


NO_SPACE_BEFORE = {".", ",", "!", "?", ";", ":", "%", ")", "]", "}", "n't", "'s", "'re", "'ve", "'ll", "'d", "'m", "'t"}
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
    report; tokenized=False: sacreBLEU's 13a BLEU on em-nat's detokenisation of output and references
    (lowercased when every reference is, so that the signature says what was computed).
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
        raise CheckpointError(f"{directory}/vocab.txt has {len(vocab)} entries but the model was built for "
                              f"{model.cfg.vocab_size}: the vocabulary does not belong to this checkpoint")
    bpe_path = os.path.join(directory, "bpe.codes")
    return model, config, vocab, BPE.load(bpe_path) if os.path.isfile(bpe_path) else None


def load_rescorer(directory, vocab, device):
    """The AR model of `directory` for NPD rescoring; it must share the NAR model's vocabulary."""
    rescorer, config, rescorer_vocab, _ = load_translator(directory, device)
    if config["model"]["kind"] != "ar":
        raise CheckpointError(f"{directory}: --rescore-with needs an AR checkpoint, this one is "
                              f"{config['model']['kind']}")
    if rescorer_vocab.itos != vocab.itos:
        raise CheckpointError(f"{directory}/vocab.txt: differs from the vocabulary of --checkpoint; the rescorer "
                              f"must come from the same run")
    return rescorer


def encode_lines(lines, vocab, bpe, max_len, warn=None):
    """Source id lists of text lines, tokenised as the training data (BPE-encoded with the run's BPE where
    em-nat learned one), cut to the model's max_len. warn(line number, unknown words): called for every
    line with words outside the vocabulary, which become <unk> (the translation is then a guess)."""
    sources = []
    for number, line in enumerate(lines, start=1):
        words = line.split()
        pieces = bpe.encode(words) if bpe is not None else words
        ids = vocab.encode(pieces)
        if warn is not None and UNK in ids:
            warn(number, sorted({p for p, i in zip(pieces, ids) if i == UNK}))
        sources.append(ids[:max_len])
    return sources


def translate_lines(lines, model, vocab, bpe, is_bpe, beam=5, alpha=1.0, length_beam=1, odd=True, rescorer=None,
                    device="cpu", precision="fp32", warn=None):
    """One output line per input line; empty or over-long input lines are handled, never dropped."""
    sources = encode_lines(lines, vocab, bpe, model.cfg.max_len, warn)
    nonempty = [i for i, s in enumerate(sources) if s]
    method = "nar" if model.cfg.kind == "nar" else ("greedy" if beam == 1 else "beam")
    outs = translate_ids(model, [sources[i] for i in nonempty], method=method, beam=beam, alpha=alpha,
                         length_beam=length_beam, odd=odd, rescorer=rescorer, device=device,
                         progress=len(nonempty) > 50, precision=precision)
    text = [""] * len(lines)
    for i, out in zip(nonempty, outs):
        text[i] = ids_to_text(out, vocab, is_bpe)
    return text


def benchmark(args, device):
    """Latency of AR (greedy, beam) vs NAR (ODD with one length, length beam + AR rescoring) on the
    same sentences in one run, with random weights: the AR model is kept from ending early (its <eos>
    logit is pushed down until the forced end) and the NAR model is given the same output length, so
    both produce exactly --tgt-len tokens and the comparison is like for like."""
    torch.manual_seed(0)
    vocab_size = 10000
    ar = Transformer(model_config(args.preset, vocab_size, "ar", dropout=0.0)).to(device).eval()
    nar = Transformer(model_config(args.preset, vocab_size, "nar", dropout=0.0)).to(device).eval()
    with torch.no_grad():
        ar.out_bias[EOS] = -1e4
    n, src_len, tgt_len = args.sentences, args.src_len, args.tgt_len
    src = torch.randint(4, vocab_size, (n, src_len), device=device)
    fixed = torch.full((n,), tgt_len, device=device)     # AR: tgt_len tokens, then the forced <eos>

    def run(fn, batch_size):
        for i in range(0, min(batch_size * 2, n), batch_size):   # warm-up
            fn(src[i:i + batch_size])
        synchronize(device)
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            fn(src[i:i + batch_size])
        synchronize(device)
        return (time.perf_counter() - start) * 1000 / n    # ms per sentence

    systems = {
        "AR greedy": lambda s: ar_greedy(ar, s, max_len=fixed[:len(s)]),
        f"AR beam {args.beam}": lambda s: ar_beam_search(ar, s, beam=args.beam, alpha=args.alpha,
                                                             max_len=fixed[:len(s)]),
        "NAR ODD (1 length)": lambda s: nar_decode(nar, s, lengths=fixed[:len(s)]),
        "NAR ODD + AR rescoring (9 lengths)": lambda s: nar_decode(   # the paper's length beam B = 9
            nar, s, length_beam=9, rescorer=ar, alpha=args.alpha, lengths=fixed[:len(s)]),
    }
    print(f"benchmark: preset {args.preset}, random weights, device {device} ({args.precision}), {n} sentences, "
          f"{src_len} source -> {tgt_len} target tokens, {torch.get_num_threads()} threads")
    table = []
    with precision_context(device, args.precision):
        for batch_size in (1, args.batch_size):
            times = {name: run(fn, batch_size) for name, fn in tqdm(systems.items(), desc=f"batch {batch_size}",
                                                                    leave=False)}
            beam_ms = times[f"AR beam {args.beam}"]
            for name, ms in times.items():
                table.append((batch_size, name, ms, 1000 / ms, beam_ms / ms, times["AR greedy"] / ms))
    print(f"\n{'batch':>5}  {'system':<40} {'ms/sent':>9} {'sent/s':>9} {'vs beam':>8} {'vs greedy':>9}")
    for batch_size, name, ms, per_s, vs_beam, vs_greedy in table:
        print(f"{batch_size:>5}  {name:<40} {ms:>9.2f} {per_s:>9.1f} {vs_beam:>7.1f}x {vs_greedy:>8.1f}x")
    return table


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows every default except the absent ones (None: those say in words where they come from)
    and a switch's False; the description and the examples keep their line breaks."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(
        description="Translate with an em-nat checkpoint (AR or NAR), or benchmark decoding latency.\n"
                    "The input must be tokenised as the training data was (em-nat applies the run's BPE\n"
                    "itself where it learned one); words outside the vocabulary are reported on stderr.",
        epilog="examples:\n"
               "  echo 'ka lu mo' | python decode.py --checkpoint runs/toy-toy/em2-nar\n"
               "  python decode.py --checkpoint runs/toy-toy/em2-nar --rescore-with runs/toy-toy/em2-ar "
               "--length-beam 9 --input src.txt\n"
               "  python decode.py --benchmark --preset iwslt",
        formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", help="a stage directory of a run, e.g. runs/toy-toy/em2-nar")
    p.add_argument("--input", help="text file, one sentence per line (default: standard input)")
    p.add_argument("--output", help="write translations here (default: standard output)")
    p.add_argument("--beam", type=int, default=5, help="AR beam size (1 = greedy)")
    p.add_argument("--alpha", type=float, help="length penalty exponent (default: the one the checkpoint's run "
                                               "used; 1.0 for the benchmark; the paper: 1.4 on IWSLT14)")
    p.add_argument("--length-beam", type=int, default=1, help="NAR: number of length candidates (paper: 1 or 9)")
    p.add_argument("--no-odd", action="store_true", help="NAR: plain argmax instead of ODD decoding")
    p.add_argument("--rescore-with", help="NAR: AR checkpoint directory that rescores the length candidates (NPD)")
    p.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on a GPU with native bf16 (compute capability 8.0+), else fp32")
    b = p.add_argument_group("benchmark (random weights; no checkpoint needed)")
    b.add_argument("--benchmark", action="store_true", help="measure AR vs NAR latency and print a table")
    b.add_argument("--preset", default="iwslt", help="model size to time")
    b.add_argument("--sentences", type=int, default=64, help="sentences timed per system and batch size")
    b.add_argument("--src-len", type=int, default=25, help="source length in tokens")
    b.add_argument("--tgt-len", type=int, default=25, help="output length in tokens")
    b.add_argument("--batch-size", type=int, default=64, help="the large batch size timed besides 1")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    try:
        args.precision = resolve_precision(args.precision, device)
    except ValueError as err:
        sys.exit(f"decode.py: {err}")
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
        print(f"decode.py: {source}:{number}: {len(unknown)} unknown word(s) become <unk>: {' '.join(unknown[:10])}"
              f"{' ...' if len(unknown) > 10 else ''}", file=sys.stderr)

    text = translate_lines(lines, model, vocab, bpe, config.get("is_bpe", False), beam=args.beam,
                           alpha=config.get("alpha", 1.0) if args.alpha is None else args.alpha,
                           length_beam=args.length_beam, odd=not args.no_odd, rescorer=rescorer, device=device,
                           precision=args.precision, warn=warn)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    out.write("".join(line + "\n" for line in text))
    if args.output:
        out.close()


if __name__ == "__main__":
    main()
