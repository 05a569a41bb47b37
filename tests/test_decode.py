"""decode.py against brute force: ODD Viterbi, beam search, greedy, NAR length beam + rescoring,
and batched decoding equal to decoding one sentence at a time."""
import itertools
import math

import pytest
import torch

from decode import (BeamState, beam_step, ar_beam_search, ar_greedy, detokenize, length_penalty, length_window,
                    nar_decode, npd_scores, odd_viterbi,
                    nbest_ids, translate_ids, translate_lines, build_parser)
from data import Vocab
from model import BOS, EOS, PAD, UNK, ModelConfig, Transformer, SPECIALS

torch.set_num_threads(2)


def tiny(kind, vocab_size=20, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, kind=kind, d_model=32, n_heads=4, d_ff=64, enc_layers=2,
                      dec_layers=2, dropout=0.0, max_len=16, **kw)
    model = Transformer(cfg).eval()
    with torch.no_grad():                                     # sharper distributions than at init
        model.embed.weight.mul_(4.0)
    return model


@pytest.mark.exercise(4)
@pytest.mark.parametrize("seed", range(20))
def test_odd_viterbi_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n, t, v = 4, 5, 5
    logp = torch.randn(n, t, v, generator=g).log_softmax(-1)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    tokens, scores = odd_viterbi(logp, lengths)
    for row in range(n):
        length = int(lengths[row])
        best = max((seq for seq in itertools.product(range(v), repeat=length)
                    if all(a != b for a, b in zip(seq, seq[1:]))),
                   key=lambda seq: sum(float(logp[row, i, y]) for i, y in enumerate(seq)))
        assert tokens[row, :length].tolist() == list(best)
        assert tokens[row, length:].eq(PAD).all()
        expected = sum(float(logp[row, i, y]) for i, y in enumerate(best))
        assert abs(float(scores[row]) - expected) < 1e-4


@pytest.mark.exercise(4)
def test_odd_removes_a_repeat_that_argmax_makes():
    logp = torch.full((1, 3, 7), -10.0)
    logp[0, 0, 4] = -0.1                                       # position 0: 4
    logp[0, 1, 4], logp[0, 1, 5] = -0.1, -0.5                  # position 1: 4, then 5
    logp[0, 2, 6] = -0.1                                       # position 2: 6
    tokens, score = odd_viterbi(logp, torch.tensor([3]))
    assert logp.argmax(-1).tolist() == [[4, 4, 6]]
    assert tokens.tolist() == [[4, 5, 6]]
    assert abs(float(score) - (-0.7)) < 1e-6


def decoding_log_probs(model, src_row, prefixes):
    """Next-token log-probabilities (as decoders see them) after each prefix, by a full teacher-forced
    pass: no cache, no batching of hypotheses across sentences. src_row: (1, src_len)."""
    with torch.no_grad():
        enc, keep = model.encode(src_row.expand(len(prefixes), -1))
        logits = model.ar_logits(torch.tensor([[BOS] + p for p in prefixes], dtype=torch.long), enc, keep)[:, -1]
    return model.decoding_log_probs(logits)   # (hypotheses, vocab)



def sequence_log_prob(model, src_row, seq):
    """log p(seq <eos> | x) under the decoding distribution, one prefix at a time."""
    total = 0.0
    for i, token in enumerate(seq + [EOS]):
        total += float(decoding_log_probs(model, src_row, [seq[:i]])[0, token])
    return total


def reference_beam_search(model, src_row, beam, alpha, max_len):
    return plain_beam_search(lambda prefixes: decoding_log_probs(model, src_row, prefixes), beam, alpha, max_len)


def plain_beam_search(next_log_probs, beam, alpha, max_len):
    """A slow, plain beam search with a finished set, for one sentence: lists of (tokens, score).
    next_log_probs(prefixes) -> (len(prefixes), vocab) log-probabilities of the next token.
    Each step: the 2*beam best extensions of the live hypotheses; those ending in <eos> join the
    finished list (ranked by score / length penalty); the beam best others stay live. At max_len
    tokens only <eos> may follow. Stop when no live hypothesis can beat the beam-th finished one."""
    penalty = lambda n: ((5.0 + n) / 6.0) ** alpha
    live, finished = [([], 0.0)], []
    for step in range(max_len + 1):
        logp = next_log_probs([seq for seq, _ in live])
        extensions = []
        for (seq, score), row in zip(live, logp.tolist()):
            for token, lp in enumerate(row):
                if lp > float("-inf") and (step < max_len or token == EOS):
                    extensions.append((seq + [token], score + lp))
        extensions.sort(key=lambda e: -e[1])
        top = extensions[:2 * beam]
        finished += [(seq[:-1], score / penalty(len(seq))) for seq, score in top if seq[-1] == EOS]
        finished = sorted(finished, key=lambda f: -f[1])[:beam]
        live = [(seq, score) for seq, score in top if seq[-1] != EOS][:beam]
        if len(finished) == beam and (not live or live[0][1] / penalty(max_len + 1) <= finished[-1][1]):
            break
    return finished


@pytest.mark.parametrize("beam", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.4])
def test_beam_search_equals_the_reference(beam, alpha):
    # A random tiny model, a batch of sources of different lengths with different length limits:
    # the batched search must return exactly the reference's N-best lists and scores.
    model = tiny("ar", vocab_size=12, seed=10 + beam)
    src = torch.tensor([[4, 5, 6, 7, 8], [9, 10, PAD, PAD, PAD], [11, 4, 9, PAD, PAD], [6, 6, 6, 6, PAD]])
    max_len = torch.tensor([6, 3, 5, 4])
    tokens, scores = ar_beam_search(model, src, beam=beam, alpha=alpha, nbest=beam, max_len=max_len)
    for row in range(src.size(0)):
        expected = reference_beam_search(model, src[row:row + 1], beam, alpha, int(max_len[row]))
        got = [[t for t in seq if t != PAD] for seq in tokens[row].tolist()]
        assert got == [seq for seq, _ in expected]
        assert scores[row].tolist() == pytest.approx([score for _, score in expected], abs=1e-5)


def test_small_beam_in_a_large_output_space_equals_the_reference():
    # 16 real tokens, outputs up to 8 tokens: ~10^9 sequences for a beam of 3, and a long search.
    model = tiny("ar", vocab_size=20, seed=7)
    src = torch.tensor([[4, 9, 13, 17, 5, 6], [19, 18, 4, PAD, PAD, PAD]])
    max_len = torch.tensor([8, 8])
    tokens, scores = ar_beam_search(model, src, beam=3, alpha=1.0, nbest=3, max_len=max_len)
    for row in range(2):
        expected = reference_beam_search(model, src[row:row + 1], 3, 1.0, 8)
        assert [[t for t in seq if t != PAD] for seq in tokens[row].tolist()] == [seq for seq, _ in expected]
        assert scores[row].tolist() == pytest.approx([score for _, score in expected], abs=1e-5)


class BigramLM:
    """A stand-in AR model for beam search: the next token's logits depend only on the sentence (the
    first source token picks a table) and the last token, with no cache. Every sequence's probability
    is known exactly, and nothing of model.py is used (so beam_step is graded on its own)."""

    def __init__(self, table):
        self.table = table                                   # (sentences, vocab, vocab) logits

    def encode(self, src):
        return src[:, :1, None].float(), src[:, :1] != PAD   # "encoder states": the table's index

    def new_cache(self):
        return []

    def ar_step(self, token, step, enc, enc_keep, cache):
        sentence = enc[:, 0, 0].long().repeat_interleave(token.size(0) // enc.size(0))
        return self.table[sentence, token]                   # (rows, vocab)

    def reorder_cache(self, cache, index):
        pass

    def shrink_cache(self, cache, hypotheses, sentences):
        pass

    def next_log_probs(self, sentence, prefixes):
        last = torch.tensor([p[-1] if p else BOS for p in prefixes])
        return self.table[sentence, last].log_softmax(-1)


def bigram_lm(sentences, vocab_size, seed):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(sentences, vocab_size, vocab_size, generator=g) * 2
    table[:, :, [PAD, BOS, UNK]] = float("-inf")             # never emitted
    return BigramLM(table)


@pytest.mark.exercise(6)
@pytest.mark.parametrize("beam, alpha", [(1, 1.0), (2, 0.0), (3, 1.4), (5, 0.6)])
def test_beam_search_on_a_bigram_model_equals_the_reference(beam, alpha):
    lm = bigram_lm(3, vocab_size=8, seed=beam)
    src, max_len = torch.tensor([[0, 5], [1, 4], [2, PAD]]), torch.tensor([5, 2, 4])
    tokens, scores = ar_beam_search(lm, src, beam=beam, alpha=alpha, nbest=beam, max_len=max_len)
    for row in range(3):
        expected = plain_beam_search(lambda p: lm.next_log_probs(row, p), beam, alpha, int(max_len[row]))
        assert [[t for t in seq if t != PAD] for seq in tokens[row].tolist()] == [seq for seq, _ in expected]
        assert scores[row].tolist() == pytest.approx([score for _, score in expected], abs=1e-5)


@pytest.mark.exercise(6)
def test_a_wide_beam_on_a_bigram_model_returns_the_brute_force_nbest():
    # 3 real tokens, at most 3 of them: 40 outputs, all of which fit in a beam of 64, so the 10-best
    # list must be the exact 10 best outputs by length-normalised log-probability.
    lm = bigram_lm(2, vocab_size=7, seed=9)
    tokens, scores = ar_beam_search(lm, torch.tensor([[0], [1]]), beam=64, alpha=1.0, nbest=10,
                                    max_len=torch.tensor([3, 3]))
    outputs = [list(seq) for n in range(4) for seq in itertools.product([4, 5, 6], repeat=n)]
    for row in range(2):
        def normalised(seq):
            logp = lm.next_log_probs(row, [seq[:i] for i in range(len(seq) + 1)])
            return float(logp.gather(1, torch.tensor(seq + [EOS])[:, None]).sum()) / ((5 + len(seq) + 1) / 6)
        best = sorted(outputs, key=normalised, reverse=True)[:10]
        assert [[t for t in seq if t != PAD] for seq in tokens[row].tolist()] == best
        assert scores[row].tolist() == pytest.approx([normalised(s) for s in best], abs=1e-5)


@pytest.mark.exercise(6)
@pytest.mark.parametrize("worst_finished, done", [(-2.5, False), (-0.2, True)])
def test_stop_rule_is_exact(worst_finished, done):
    # Known answer for the stop rule. Live raw scores -3 and -4 at step 2; every next token (4, 5 or
    # <eos>) costs log 3. Best live extension: -3 - log 3 = -4.10; with alpha 1.4 and at most 10 tokens
    # (11 with <eos>) it can still reach -4.10 / ((5 + 11) / 6)^1.4 = -1.04. That beats a worst finished
    # score of -2.5 (keep searching, although -4.10 < -2.5: a raw-score test would stop), not -0.2.
    logits = torch.full((2, 6), float("-inf"))
    logits[:, [EOS, 4, 5]] = 0.0
    state = BeamState(index=torch.tensor([0]), max_len=torch.tensor([10]), shortest_limit=10,
                      bound=length_penalty(torch.tensor([11]), 1.4), tokens=torch.tensor([[BOS, 4, 5], [BOS, 5, 4]]),
                      scores=torch.tensor([[-3.0, -4.0]]), fin_tokens=torch.full((1, 2, 11), PAD),
                      fin_scores=torch.tensor([[-0.1, worst_finished]]))
    state, _ = beam_step(state, logits, 2, 2, 1.4)
    assert state.fin_scores[0].tolist() == pytest.approx([-0.1, worst_finished])
    assert bool(state.scores[0, 0] == float("-inf")) == done


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_large_beam_finds_the_brute_force_best(alpha):
    # Vocabulary: 4 specials + 3 real tokens; outputs of at most 3 tokens (+ <eos>): 40 sequences.
    model = tiny("ar", vocab_size=7, seed=3)
    src = torch.tensor([[4, 5, 6, 4], [6, 6, 5, PAD]])
    max_len = torch.tensor([3, 3])                            # <eos> forced after 3 tokens
    tokens, scores = ar_beam_search(model, src, beam=64, alpha=alpha, max_len=max_len)
    candidates = [list(seq) for n in range(4) for seq in itertools.product([4, 5, 6], repeat=n)]
    for row in range(2):
        normalised = [sequence_log_prob(model, src[row:row + 1], c) / float(length_penalty(torch.tensor(len(c) + 1),
                                                                                           alpha))
                      for c in candidates]
        best = max(range(len(candidates)), key=lambda i: normalised[i])
        assert [t for t in tokens[row, 0].tolist() if t != PAD] == candidates[best]
        assert abs(float(scores[row, 0]) - normalised[best]) < 1e-4


def test_outputs_may_hold_max_len_tokens():
    # With <eos> pushed far down, every output runs to the limit: exactly max_len tokens, for greedy
    # and beam search alike.
    model = tiny("ar", seed=2)
    with torch.no_grad():
        model.out_bias[EOS] = -1e3
    src = torch.tensor([[4, 5, 6], [7, 8, PAD]])
    max_len = torch.tensor([5, 2])
    assert (ar_greedy(model, src, max_len=max_len) != PAD).sum(1).tolist() == [5, 2]
    tokens, _ = ar_beam_search(model, src, beam=3, nbest=3, max_len=max_len)
    assert (tokens != PAD).sum(2).tolist() == [[5, 5, 5], [2, 2, 2]]


def test_decoders_never_emit_special_tokens():
    # A model that puts almost all mass on <pad>, <bos> and <unk>: decoders must still emit real tokens.
    ar, nar = tiny("ar", seed=8), tiny("nar", seed=8)
    for model in (ar, nar):
        with torch.no_grad():
            model.out_bias[[PAD, BOS, UNK]] = 50.0
    src = torch.randint(4, 20, (4, 6), generator=torch.Generator().manual_seed(5))
    outputs = [ar_greedy(ar, src), ar_beam_search(ar, src, beam=4, nbest=4)[0],
               nar_decode(nar, src), nar_decode(nar, src, odd=False), nar_decode(nar, src, length_beam=3, rescorer=ar)]
    for out in outputs:
        assert not torch.isin(out, torch.tensor([BOS, UNK, EOS])).any()
        assert (out != PAD).any()


def test_scoring_masks_no_token_of_the_target():
    # A target holding <unk> gets its real (finite) probability from both models.
    ar, nar = tiny("ar", seed=8), tiny("nar", seed=8)
    src, tgt = torch.tensor([[4, 5, 6]]), torch.tensor([[7, UNK, 9]])
    for model in (ar, nar):
        score = float(model.score(src, tgt))
        assert math.isfinite(score) and score < 0


def test_nbest_is_sorted_distinct_and_scored_right():
    model = tiny("ar", vocab_size=7, seed=3)
    src = torch.tensor([[4, 5, 6, 4]])
    tokens, scores = ar_beam_search(model, src, beam=8, nbest=8, alpha=1.0, max_len=torch.tensor([4]))
    seqs = [[t for t in row if t != PAD] for row in tokens[0].tolist()]
    assert len({tuple(s) for s in seqs}) == 8
    assert scores[0].tolist() == sorted(scores[0].tolist(), reverse=True)
    direct = [sequence_log_prob(model, src, s) / float(length_penalty(torch.tensor(len(s) + 1), 1.0)) for s in seqs]
    assert scores[0].tolist() == pytest.approx(direct, abs=1e-4)


@pytest.mark.parametrize("center, beam, expected", [
    (1, 5, [1, 2, 3, 4, 5]),          # lower edge: the window shifts up, never below length 1
    (2, 5, [1, 2, 3, 4, 5]),
    (8, 5, [6, 7, 8, 9, 10]),         # centred
    (8, 4, [6, 7, 8, 9]),
    (15, 5, [12, 13, 14, 15, 16]),    # upper edge (max_len 16): shifted down, still 5 distinct lengths
    (16, 9, [8, 9, 10, 11, 12, 13, 14, 15, 16]),
    (16, 1, [16]),
])
@pytest.mark.exercise(5)
def test_length_window_known_answers(center, beam, expected):
    assert length_window(torch.tensor([center]), beam, 16).tolist() == [expected]


@pytest.mark.exercise(5)
def test_npd_scores_known_answer():
    # NPD ranks a NAR candidate y by log p_AR(y <eos> | x) / ((5 + |y| + 1) / 6)^alpha: the penalty
    # counts <eos>, as beam search does for finished outputs. A stand-in AR model gives -3 and -6.
    class Rescorer:
        def score(self, src, tokens):
            return torch.tensor([-3.0, -6.0])

    tokens = torch.tensor([[4, 5, PAD, PAD], [4, 5, 6, 7]])
    got = npd_scores(Rescorer(), torch.ones(2, 3, dtype=torch.long), tokens, torch.tensor([2, 4]), 1.0)
    assert got.tolist() == pytest.approx([-3.0 / (8 / 6), -6.0 / (10 / 6)])
    got = npd_scores(Rescorer(), torch.ones(2, 3, dtype=torch.long), tokens, torch.tensor([2, 4]), 0.0)
    assert got.tolist() == pytest.approx([-3.0, -6.0])


def test_nar_decodes_the_window_at_both_edges():
    # A stand-in rescorer that likes one length only: the output has that length exactly when the
    # window around the predicted length holds it (max_len 16, length beam 5).
    class LikesLength:
        def __init__(self, wanted):
            self.wanted = wanted

        def score(self, src, tokens):
            return torch.where((tokens != PAD).sum(1) == self.wanted, 0.0, -100.0)

    nar = tiny("nar", seed=1)
    src = torch.randint(4, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    for center, wanted in ((1, 5), (2, 1), (16, 12), (15, 16)):
        out = nar_decode(nar, src, length_beam=5, rescorer=LikesLength(wanted), lengths=torch.tensor([center] * 2))
        assert (out != PAD).sum(1).tolist() == [wanted, wanted]


def test_nar_length_beam_with_rescoring_picks_the_best_candidate():
    nar, ar = tiny("nar", seed=1), tiny("ar", seed=2)
    src = torch.randint(4, 20, (3, 6), generator=torch.Generator().manual_seed(2))
    center = torch.tensor([4, 5, 6])
    chosen = nar_decode(nar, src, length_beam=3, rescorer=ar, alpha=1.0, lengths=center)
    for row in range(3):
        best, best_score = None, float("-inf")
        for length in (int(center[row]) - 1, int(center[row]), int(center[row]) + 1):
            cand = nar_decode(nar, src[row:row + 1], lengths=torch.tensor([length]))
            score = float(ar.score(src[row:row + 1], cand)) / float(length_penalty(torch.tensor(length + 1), 1.0))
            if score > best_score:
                best, best_score = cand[0].tolist(), score
        got = chosen[row].tolist()
        assert got[:len(best)] == best and all(t == PAD for t in got[len(best):])


def test_nar_uses_the_predicted_length():
    nar = tiny("nar", seed=4)
    src = torch.randint(4, 20, (5, 6), generator=torch.Generator().manual_seed(3))
    enc, _ = nar.encode(src)
    logits = nar.length_logits(enc)
    logits[:, 0] = float("-inf")
    predicted = logits.argmax(-1)
    out = nar_decode(nar, src)
    assert (out != PAD).sum(1).tolist() == predicted.tolist()


@pytest.mark.parametrize("method", ["greedy", "beam", "nar"])
def test_batched_decoding_equals_one_sentence_at_a_time(method):
    model = tiny("nar" if method == "nar" else "ar", seed=5)
    g = torch.Generator().manual_seed(4)
    sources = [torch.randint(4, 20, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (17,), generator=g)]
    batched = translate_ids(model, sources, method=method, beam=4, max_tokens=64)
    single = [translate_ids(model, [s], method=method, beam=4, max_tokens=64)[0] for s in sources]
    assert batched == single


def test_translate_lines_gives_one_output_per_input_line():
    model = tiny("nar", vocab_size=8)
    vocab = Vocab(SPECIALS + ["a", "b", "c", "d"])
    args = build_parser().parse_args([])
    lines = ["a b c", "", "zzz unknown words", "a " * 40, "   "]
    out = translate_lines(lines, model, vocab, None, False, args, None, "cpu")
    assert len(out) == len(lines)
    assert out[1] == "" and out[4] == ""
    assert all(isinstance(o, str) for o in out)


def test_detokenize_known_answers():
    assert detokenize("it &apos;s fine , isn &apos;t it ?") == "it's fine, isn't it?"
    assert detokenize("he said &quot; yes . &quot; ( really )") == 'he said "yes." (really)'


def test_one_candidate_is_a_list_of_one():
    # --candidates 1: the N-best of beam 1 is the beam-1 translation, in the same list-of-lists shape.
    model = tiny("ar", seed=5)
    sources = [[4, 5, 6], [7, 8], [9, 10, 11, 12]]
    assert nbest_ids(model, sources, 1)[0] == [[t] for t in translate_ids(model, sources, method="beam", beam=1)]
    candidates, scores = nbest_ids(model, sources, 3)
    assert [len(c) for c in candidates] == [len(s) for s in scores] == [3, 3, 3]
    assert all(s == sorted(s, reverse=True) for s in scores)
