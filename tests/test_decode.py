"""decode.py against brute force: ODD Viterbi, beam search, greedy, NAR length beam + rescoring,
and batched decoding equal to decoding one sentence at a time."""
import itertools
import math

import pytest
import torch

import decode
from decode import (BeamState, beam_step, ar_beam_search, ar_greedy, detokenize, length_penalty,
                    length_window, nar_decode, npd_scores, odd_viterbi,
                    nbest_ids, translate_ids, translate_lines, build_parser)
from data import Vocab
from model import BOS, EOS, PAD, UNK, ModelConfig, Transformer, SPECIALS
from one_device import PretendDevice, on_the_device

torch.set_num_threads(2)


def tiny(kind, vocab_size=20, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, kind=kind, d_model=32, n_heads=4, d_ff=64,
                      enc_layers=2, dec_layers=2, dropout=0.0, max_len=16, **kw)
    model = Transformer(cfg).eval()
    with torch.no_grad():                                     # sharper distributions than at init
        model.embed.weight.mul_(4.0)
    return model


def assert_odd_equals_brute_force(logp, lengths):
    """odd_viterbi against enumeration of every sequence with no two equal neighbours (of the
    tokens that are not -inf), row by row: tokens (batch, t) PAD past the length, and scores."""
    n, t, v = logp.shape
    given = logp.clone()
    tokens, scores = odd_viterbi(logp, lengths)
    assert tokens.shape == (n, t) and scores.shape == (n,)
    assert torch.equal(logp, given), "odd_viterbi changed its input"
    for row, table in enumerate(logp.tolist()):
        length = int(lengths[row])
        allowed = [[y for y in range(v) if table[i][y] > float("-inf")] for i in range(length)]
        no_repeats = (seq for seq in itertools.product(*allowed)
                      if all(a != b for a, b in zip(seq, seq[1:])))
        best = max(no_repeats, key=lambda seq: sum(table[i][y] for i, y in enumerate(seq)))
        assert tokens[row, :length].tolist() == list(best)
        assert tokens[row, length:].eq(PAD).all()
        assert abs(float(scores[row]) - sum(table[i][y] for i, y in enumerate(best))) < 1e-4


@pytest.mark.exercise(4)
@pytest.mark.parametrize("seed", range(20))
def test_odd_viterbi_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n, t, v = 4, 5, 5
    logp = torch.randn(n, t, v, generator=g).log_softmax(-1)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    assert_odd_equals_brute_force(logp, lengths)


@pytest.mark.exercise(4)
@pytest.mark.parametrize("seed", range(4))
def test_odd_viterbi_as_nar_decode_calls_it(seed):
    # The special tokens at -inf (decoding_log_probs), a batch with every length from 1 to t, and
    # outputs of one position (t = 1: no neighbours at all).
    g = torch.Generator().manual_seed(seed)
    for n, t, lengths in ((5, 4, [4, 1, 3, 2, 4]), (3, 1, [1, 1, 1])):
        banned = torch.zeros(8).index_fill(0, torch.tensor([PAD, EOS, UNK, BOS]), float("-inf"))
        logp = (torch.randn(n, t, 8, generator=g) * 2 + banned).log_softmax(-1)
        assert_odd_equals_brute_force(logp, torch.tensor(lengths))


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


@pytest.mark.exercise(4)
def test_odd_needs_the_third_best_token_of_a_position():
    # Position 1's two best tokens (4 and 5) are its neighbours' choices: only its third best (6) is
    # allowed, so a Viterbi over the top 2 tokens per position must give up a neighbour's best
    # instead ([7, 4, 5], score -11.1) of the optimum [4, 6, 5] (score -3.2).
    logp = torch.full((2, 3, 8), -20.0)
    # left neighbour: 4, far ahead of the rest
    logp[:, 0, 4] = -0.1
    logp[:, 2, 5] = -0.1                                       # right neighbour: 5
    logp[:, 1, 4], logp[:, 1, 5], logp[:, 1, 6] = -1.0, -2.0, -3.0
    # the neighbours' second choices are poor
    logp[:, 0, 7] = logp[:, 2, 7] = -10.0
    tokens, score = odd_viterbi(logp, torch.tensor([3, 2]))
    # row 2 has length 2: no right neighbour
    assert tokens.tolist() == [[4, 6, 5], [4, 5, PAD]]
    assert score.tolist() == pytest.approx([-3.2, -2.1])


@pytest.mark.exercise(4)
def test_odd_never_repeats_however_unlikely_the_alternatives():
    # Token 4 is 30,000 nats ahead of every other token at both positions: any output without a
    # repeat pays that once, and ODD must pay it (a finite penalty for a repeat, say -1e4, would
    # not).
    logp = torch.full((2, 2, 6), -3e4)
    logp[:, :, 4] = 0.0
    tokens, scores = odd_viterbi(logp, torch.tensor([2, 1]))
    assert tokens[0, 0] != tokens[0, 1] and 4 in tokens[0].tolist()
    assert tokens[1].tolist() == [4, PAD]
    assert scores.tolist() == pytest.approx([-3e4, 0.0])


@pytest.mark.exercise(4)
def test_odd_viterbi_stays_on_the_device_of_its_input():
    # Every tensor it makes lies on logp's device: one made on the CPU by mistake (torch.arange(t)
    # with no device) would meet logp on a GPU (tests/one_device.py checks it on the CPU).
    g = torch.Generator().manual_seed(0)
    for t, lengths in ((1, [1, 1, 1]), (4, [4, 1, 3])):
        logp, lengths = torch.randn(3, t, 8, generator=g).log_softmax(-1), torch.tensor(lengths)
        with PretendDevice(logp, lengths):
            tokens, scores = odd_viterbi(logp, lengths)
        assert on_the_device(tokens) and on_the_device(scores)
        assert tokens.shape == (3, t) and scores.shape == (3,)


def decoding_log_probs(model, src_row, prefixes):
    """Next-token log-probabilities (as decoders see them) after each prefix, by a full
    teacher-forced pass: no cache, no batching of hypotheses across sentences. src_row: (1,
    src_len)."""
    with torch.no_grad():
        enc, keep = model.encode(src_row.expand(len(prefixes), -1))
        logits = model.ar_logits(torch.tensor([[BOS] + p for p in prefixes],
                                              dtype=torch.long), enc, keep)[:, -1]
    return model.decoding_log_probs(logits)   # (hypotheses, vocab)



def sequence_log_prob(model, src_row, seq):
    """log p(seq <eos> | x) under the decoding distribution, one prefix at a time."""
    total = 0.0
    for i, token in enumerate(seq + [EOS]):
        total += float(decoding_log_probs(model, src_row, [seq[:i]])[0, token])
    return total


def reference_beam_search(model, src_row, beam, alpha, max_len):
    return plain_beam_search(lambda prefixes: decoding_log_probs(model, src_row, prefixes), beam,
                             alpha, max_len)


def plain_beam_search(next_log_probs, beam, alpha, max_len):
    """The tests' slow reference for beam search with a finished set, for one sentence, on lists:
    the `beam` best finished outputs as (tokens, score), best first. next_log_probs(prefixes) ->
    (len(prefixes), vocab) log-probabilities of the next token. A student's copy holds no reference
    of an exercise it cuts out: there this body is a skip, and so are the tests that need it."""
    # >>> exercise 6: beam search with a finished set
    # Each step: the 2*beam best extensions of the live hypotheses; those ending in <eos> join the
    # finished list (ranked by score / length penalty); the beam best others stay live. At max_len
    # tokens only <eos> may follow. Stop when no live hypothesis can beat the beam-th finished one.
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
        if len(finished) == beam and (not live
                                      or live[0][1] / penalty(max_len + 1) <= finished[-1][1]):
            break
    return finished
    # <<< exercise 6


@pytest.mark.parametrize("beam", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.4])
def test_beam_search_equals_the_reference(beam, alpha):
    # A random tiny model, a batch of sources of different lengths with different length limits:
    # the batched search must return exactly the reference's N-best lists and scores.
    model = tiny("ar", vocab_size=12, seed=10 + beam)
    src = torch.tensor([[4, 5, 6, 7, 8], [9, 10, PAD, PAD, PAD], [11, 4, 9, PAD, PAD],
                        [6, 6, 6, 6, PAD]])
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
        assert [[t for t in seq
                 if t != PAD] for seq in tokens[row].tolist()] == [seq for seq, _ in expected]
        assert scores[row].tolist() == pytest.approx([score for _, score in expected], abs=1e-5)


def test_beams_that_switch_parents_read_the_reordered_cache(monkeypatch):
    # The other real-model tests use sharpened tiny models whose beams almost never switch parent
    # hypotheses, so a search that never reordered the cache would pass them. Here, with the default
    # initialisation's flatter distributions, the beams do switch while live (step 1: sentence 0's
    # new hypotheses come from its hypotheses [0, 2, 1]; several more later), and the search must
    # still equal the reference, which recomputes every prefix from scratch without a cache.
    model = tiny("ar", vocab_size=12, seed=0)
    with torch.no_grad():
        model.embed.weight.div_(4.0)                          # undo tiny's sharpening
    src, max_len, beam = torch.tensor([[4, 5, 6, 7], [8, 9, 10, PAD]]), torch.tensor([6, 6]), 3
    switches, real_step = [], decode.beam_step

    def recording_step(state, logits, step, k, alpha):
        new, rows = real_step(state, logits, step, k, alpha)
        for i, sentence in enumerate(state.index.tolist()):
            parents = (rows[i * k:(i + 1) * k] - i * k).tolist()
            all_live = bool((new.scores[i] > float("-inf")).all())
            if step > 0 and all_live and parents != list(range(k)):
                switches.append((step, sentence, parents))
        return new, rows

    monkeypatch.setattr(decode, "beam_step", recording_step)
    tokens, scores = ar_beam_search(model, src, beam=beam, alpha=1.0, nbest=beam, max_len=max_len)
    assert switches, "no live beam switched parents: this test would not see a cache left unordered"
    for row in range(2):
        expected = reference_beam_search(model, src[row:row + 1], beam, 1.0, int(max_len[row]))
        assert [[t for t in seq
                 if t != PAD] for seq in tokens[row].tolist()] == [seq for seq, _ in expected]
        assert scores[row].tolist() == pytest.approx([score for _, score in expected], abs=1e-5)


class HistoryLM:
    """A stand-in AR model for beam search whose next-token logits depend on the sentence (the first
    source token picks a table) and on the whole prefix, which it reads from its cache: row r of the
    cache holds every token fed to row r so far, and reorder_cache / shrink_cache move those rows as
    model.py's do. So a beam step that returns the wrong rows, or a search that never reorders the
    cache, feeds a hypothesis another one's history and changes the output. Every sequence's
    probability is known exactly (next_log_probs reads the prefix itself), and nothing of model.py
    is used (so beam_step is graded on its own)."""
    # prefixes are hashed into this many rows
    CONTEXTS = 97

    def __init__(self, table):
        self.table = table                                   # (sentences, CONTEXTS, vocab) logits

    def encode(self, src):
        return src[:, :1, None].float(), src[:, :1] != PAD   # "encoder states": the table's index

    def new_cache(self):
        return {"history": None}

    def context(self, history):
        """(rows, steps) tokens fed, <bos> first -> (rows,) the table row of that prefix."""
        h = torch.zeros(history.size(0), dtype=torch.long)
        for column in history.unbind(1):
            h = (h * 31 + column + 1) % self.CONTEXTS
        return h

    def ar_step(self, token, step, enc, enc_keep, cache):
        history = token[:, None] if cache["history"] is None else torch.cat(
            [cache["history"], token[:, None]], 1)
        assert history.size(1) == step + 1, "the cache must grow by one step per call"
        cache["history"] = history
        sentence = enc[:, 0, 0].long().repeat_interleave(token.size(0) // enc.size(0))
        return self.step_logits(sentence, history)           # (rows, vocab)

    def step_logits(self, sentence, history):
        return self.table[sentence, self.context(history)]

    def reorder_cache(self, cache, index):
        cache["history"] = cache["history"].index_select(0, index)

    def shrink_cache(self, cache, hypotheses, sentences):
        cache["history"] = cache["history"].index_select(0, hypotheses)

    def next_log_probs(self, sentence, prefixes):
        contexts = torch.cat([self.context(torch.tensor([[BOS] + p])) for p in prefixes])
        return self.table[sentence, contexts].log_softmax(-1)


def history_lm(sentences, vocab_size, seed):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(sentences, HistoryLM.CONTEXTS, vocab_size, generator=g) * 2
    table[:, :, [PAD, BOS, UNK]] = float("-inf")             # never emitted
    return HistoryLM(table)


# Known answers of beam search on history_lm(3, 8, seed=beam) for the sources and length limits of
# BEAM_CASE: {(beam, alpha): per sentence, its `beam` best outputs and scores, best first}. They
# were computed by plain_beam_search, and test_the_known_answers_are_the_references checks that they
# still are.
BEAM_CASE = ([[0, 5], [1, 4], [2, PAD]], [5, 2, 4])
BEAM_ANSWERS = {
    (1, 1.0): [
        [([4, 4, 7, 5, 7], -1.75152)],
        [([], -0.05349)],
        [([6], -0.38343)],
    ],
    (2, 0.0): [
        [([], -0.04761), ([6, 5], -5.23949)],
        [([5, 7], -2.03621), ([4, 4], -2.58854)],
        [([6, 4, 5, 4], -2.43195), ([6, 4, 7], -2.69318)],
    ],
    (3, 1.4): [
        [([6, 7, 5, 5], -1.0991), ([4], -1.26251), ([6, 7, 5], -1.79369)],
        [([7, 7], -2.26556), ([5, 6], -2.84202), ([5], -2.86259)],
        [([4, 7, 5, 5], -1.16697), ([4, 7, 6], -1.37262), ([], -1.51594)],
    ],
    (5, 0.6): [
        [([4], -0.51957), ([4, 5, 5], -3.29726), ([4, 4], -3.71156), ([4, 6, 4], -3.73777),
         ([6, 4, 4, 4], -3.9131)],
        [([5], -1.00837), ([], -1.69478), ([5, 7], -2.27787), ([5, 6], -4.54709),
         ([5, 4], -4.70839)],
        [([], -0.98792), ([5, 5], -2.76848), ([4, 5, 6, 5], -2.90781), ([4, 5], -2.95872),
         ([4, 5, 6], -3.19295)],
    ],
}


@pytest.mark.exercise(6)
@pytest.mark.parametrize("beam, alpha", list(BEAM_ANSWERS))
def test_beam_search_on_a_history_model_gives_the_known_answers(beam, alpha):
    lm = history_lm(3, vocab_size=8, seed=beam)
    src, max_len = torch.tensor(BEAM_CASE[0]), torch.tensor(BEAM_CASE[1])
    tokens, scores = ar_beam_search(lm, src, beam=beam, alpha=alpha, nbest=beam, max_len=max_len)
    for row, expected in enumerate(BEAM_ANSWERS[beam, alpha]):
        assert [[t for t in seq
                 if t != PAD] for seq in tokens[row].tolist()] == [seq for seq, _ in expected], \
            f"sentence {row}"
        assert scores[row].tolist() == pytest.approx([score for _, score in expected],
                                                     abs=1e-4), f"sentence {row}"


@pytest.mark.parametrize("beam, alpha", list(BEAM_ANSWERS))
def test_the_known_answers_are_the_references(beam, alpha):
    lm = history_lm(3, vocab_size=8, seed=beam)
    for row, expected in enumerate(BEAM_ANSWERS[beam, alpha]):
        got = plain_beam_search(lambda p: lm.next_log_probs(row, p), beam, alpha, BEAM_CASE[1][row])
        assert [seq for seq, _ in got] == [seq for seq, _ in expected]
        assert [score for _, score in got] == pytest.approx([score for _, score in expected],
                                                            abs=1e-4)


@pytest.mark.exercise(6)
def test_a_wide_beam_on_a_history_model_returns_the_brute_force_nbest():
    # 3 real tokens, at most 3 of them: 40 outputs, all of which fit in a beam of 64, so the 10-best
    # list must be the exact 10 best outputs by length-normalised log-probability.
    lm = history_lm(2, vocab_size=7, seed=9)
    tokens, scores = ar_beam_search(lm, torch.tensor([[0], [1]]), beam=64, alpha=1.0, nbest=10,
                                    max_len=torch.tensor([3, 3]))
    outputs = [list(seq) for n in range(4) for seq in itertools.product([4, 5, 6], repeat=n)]
    for row in range(2):
        def normalised(seq):
            logp = lm.next_log_probs(row, [seq[:i] for i in range(len(seq) + 1)])
            return float(logp.gather(1, torch.tensor(seq + [EOS])[:, None]).sum()) / (
                (5 + len(seq) + 1) / 6)
        best = sorted(outputs, key=normalised, reverse=True)[:10]
        assert [[t for t in seq if t != PAD] for seq in tokens[row].tolist()] == best
        assert scores[row].tolist() == pytest.approx([normalised(s) for s in best], abs=1e-5)


def two_sentence_state(tokens, scores, max_len=(10, 10)):
    """A BeamState of 2 sentences with beam 2, at step tokens.size(1) - 1, with empty finished
    sets."""
    max_len = torch.tensor(max_len)
    return BeamState(index=torch.tensor([0, 1]), max_len=max_len, shortest_limit=int(max_len.min()),
                     bound=length_penalty(max_len + 1, 1.0), tokens=torch.tensor(tokens),
                     scores=torch.tensor(scores),
                     fin_tokens=torch.full((2, 2, int(max_len.max()) + 1), PAD),
                     fin_scores=torch.full((2, 2), float("-inf")))


@pytest.mark.exercise(6)
def test_beam_step_returns_the_rows_the_live_hypotheses_came_from():
    # Rows are flat over all sentences: hypothesis j of sentence i is row i * beam + j. In sentence
    # 1 both new live hypotheses extend its second hypothesis (row 3); in sentence 0 they swap
    # parents.
    logits = torch.full((4, 7), float("-inf"))
    logits[:, EOS] = -5.0
    # sentence 0: each parent has one good token
    logits[0, 4], logits[1, 5] = 0.0, 0.0
    logits[2, 4] = -5.0
    # sentence 1: its second parent has two
    logits[3, 5], logits[3, 6] = 0.0, -0.5
    state = two_sentence_state([[BOS, 6], [BOS, 4], [BOS, 4], [BOS, 6]],
                               [[-2.0, -1.0], [-3.0, -1.0]])
    state, rows = beam_step(state, logits, 1, 2, 1.0)
    assert rows.tolist() == [1, 0, 3, 3]
    assert state.tokens.tolist() == [[BOS, 4, 5], [BOS, 6, 4], [BOS, 6, 5], [BOS, 6, 6]]
    norm = math.log(1 + math.exp(-0.5) + math.exp(-5))
    assert state.scores[1].tolist() == pytest.approx([-1.0 - norm, -1.5 - norm])


@pytest.mark.exercise(6)
def test_the_forced_eos_keeps_its_real_log_probability_and_a_done_sentence_has_no_live_score():
    # Sentence 0 is at its length limit (2 tokens): only <eos> may follow, at its log-probability
    # under the whole distribution (normalised before the other tokens are forbidden), not at log 1
    # = 0. Its search is then done: every live score of a done sentence is -inf. Sentence 1 goes on.
    logits = torch.zeros(4, 7)
    logits[:, [PAD, BOS, UNK]] = float("-inf")                 # 4 emittable tokens: <eos>, 4, 5, 6
    state = two_sentence_state([[BOS, 4, 5], [BOS, 5, 4], [BOS, 4, 5], [BOS, 5, 4]],
                               [[-1.0, -2.0], [-1.0, -2.0]], max_len=(2, 10))
    state, _ = beam_step(state, logits, 2, 2, 1.0)
    penalty = float(length_penalty(3, 1.0))
    assert state.fin_scores[0].tolist() == pytest.approx([(-1.0 - math.log(4)) / penalty,
                                                          (-2.0 - math.log(4)) / penalty])
    assert state.fin_tokens[0, :, :2].tolist() == [[4, 5], [5, 4]]
    assert state.scores[0].tolist() == [float("-inf")] * 2
    assert (state.scores[1] > float("-inf")).all()


@pytest.mark.exercise(6)
@pytest.mark.parametrize("worst_finished, done", [(-2.5, False), (-0.2, True)])
def test_stop_rule_is_exact(worst_finished, done):
    # Known answer for the stop rule. Live raw scores -3 and -4 at step 2; every next token (4, 5 or
    # <eos>) costs log 3. Best live extension: -3 - log 3 = -4.10; with alpha 1.4 and at most 10
    # tokens (11 with <eos>) it can still reach -4.10 / ((5 + 11) / 6)^1.4 = -1.04. That beats a
    # worst finished score of -2.5 (keep searching, although -4.10 < -2.5: a raw-score test would
    # stop), not -0.2.
    logits = torch.full((2, 6), float("-inf"))
    logits[:, [EOS, 4, 5]] = 0.0
    state = BeamState(index=torch.tensor([0]), max_len=torch.tensor([10]), shortest_limit=10,
                      bound=length_penalty(torch.tensor([11]), 1.4),
                      tokens=torch.tensor([[BOS, 4, 5], [BOS, 5, 4]]),
                      scores=torch.tensor([[-3.0, -4.0]]), fin_tokens=torch.full((1, 2, 11), PAD),
                      fin_scores=torch.tensor([[-0.1, worst_finished]]))
    state, _ = beam_step(state, logits, 2, 2, 1.4)
    assert state.fin_scores[0].tolist() == pytest.approx([-0.1, worst_finished])
    assert bool(state.scores[0, 0] == float("-inf")) == done


@pytest.mark.exercise(6)
@pytest.mark.parametrize("worst_finished, done", [((-1.1, -2.1), (False, False)),
                                                   ((-1.0, -1.5), (True, True)),
                                                   ((-1.0, -2.1), (True, False)),
                                                   ((-1.1, -1.5), (False, True))])
def test_stop_rule_bounds_each_sentence_by_its_own_longest_output(worst_finished, done):
    # Known answers. Two sentences at step 2, alpha 1.4, with limits of 10 and 4 tokens; their best
    # live extension scores -3 - log 3 = -4.0986 raw (every next token costs log 3). Sentence 0 can
    # reach -4.0986 / ((5 + 11) / 6)^1.4 = -1.0381, sentence 1 -4.0986 / ((5 + 5) / 6)^1.4 =
    # -2.0046:
    # sentence 0 goes on against -1.1 (with the penalty of 10 tokens, -1.1363, it would stop) and
    # stops at -1.0; sentence 1 goes on against -2.1 and stops at -1.5 (with sentence 0's bound,
    # -1.0381, it would go on). A done sentence has all its live scores at -inf, the others none,
    # also where one sentence of the batch is done and the other is not.
    logits = torch.full((4, 6), float("-inf"))
    logits[:, [EOS, 4, 5]] = 0.0
    max_len = torch.tensor([10, 4])
    state = BeamState(index=torch.tensor([0, 1]), max_len=max_len, shortest_limit=4,
                      bound=length_penalty(max_len + 1, 1.4),
                      tokens=torch.tensor([[BOS, 4, 5], [BOS, 5, 4], [BOS, 4, 4], [BOS, 5, 5]]),
                      scores=torch.tensor([[-3.0, -4.0], [-3.0, -4.0]]),
                      fin_tokens=torch.full((2, 2, 11), PAD),
                      fin_scores=torch.tensor([[-0.1, w] for w in worst_finished]))
    state, _ = beam_step(state, logits, 2, 2, 1.4)
    for sentence, (w, stops) in enumerate(zip(worst_finished, done)):
        assert state.fin_scores[sentence].tolist() == pytest.approx([-0.1, w])
        live = state.scores[sentence]
        assert ((live == float("-inf")) if stops else (live > float("-inf"))).all(), sentence


@pytest.mark.exercise(6)
def test_stop_rule_stops_on_a_tie():
    # Known answer, exact in floating point: alpha 0 (the bound is 1), each live hypothesis has one
    # allowed token (log-probability exactly 0), so the best live extension scores exactly -1.0,
    # equal to the k-th finished score: nothing can beat it any more, and the sentence is done.
    logits = torch.full((2, 6), float("-inf"))
    logits[0, 4] = logits[1, 5] = 0.0
    state = BeamState(index=torch.tensor([0]), max_len=torch.tensor([10]), shortest_limit=10,
                      bound=length_penalty(torch.tensor([11]), 0.0),
                      tokens=torch.tensor([[BOS, 4], [BOS, 5]]),
                      scores=torch.tensor([[-1.0, -2.0]]), fin_tokens=torch.full((1, 2, 11), PAD),
                      fin_scores=torch.tensor([[-0.5, -1.0]]))
    state, _ = beam_step(state, logits, 1, 2, 0.0)
    assert state.fin_scores[0].tolist() == [-0.5, -1.0]
    assert (state.scores[0] == float("-inf")).all()


def reference_beam_step(state, logits, step, k, alpha):
    """beam_step's docstring written out, sentence by sentence and token by token, in plain Python.
    Returns fin (per sentence: [(score, tokens)] best first), live (per sentence: [(raw score, parent
    row, token)] best first, [] when done) and, to show which cases a trial holds, whether some
    <eos> extension outside the 2k best would have entered the finished set, and whether this
    step's merge decided that the sentence is done."""
    inf = float("-inf")
    fins, lives, eos_outside, merge_decides = [], [], False, False
    for i in range(state.scores.size(0)):
        extensions = []                                           # (raw score, parent row, token)
        for j in range(k):
            row, score = i * k + j, float(state.scores[i, j])
            if score == inf:
                continue
            row_logits = logits[row].tolist()
            log_norm = math.log(sum(math.exp(x) for x in row_logits if x > inf))
            for token, x in enumerate(row_logits):
                at_limit = step >= int(state.max_len[i])
                if x > inf and (token == EOS or not at_limit):
                    extensions.append((score + x - log_norm, row, token))
        extensions.sort(key=lambda e: -e[0])
        best = extensions[:2 * k]
        penalty = float(length_penalty(step + 1, alpha))

        def finished(row):                                   # the output, without <bos>
            return state.tokens[row, 1:].tolist()

        old = [(float(state.fin_scores[i, j]), [t for t in state.fin_tokens[i, j].tolist()
                                                if t != PAD])
               for j in range(k) if float(state.fin_scores[i, j]) > inf]
        ended = [(score / penalty, finished(row)) for score, row, token in best if token == EOS]
        fin = sorted(old + ended, key=lambda f: -f[0])[:k]
        every_eos = [(score / penalty, finished(row)) for score, row, token in extensions
                     if token == EOS]
        if sorted(old + every_eos, key=lambda f: -f[0])[:k] != fin:
            eos_outside = True
        live = [e for e in best if e[2] != EOS][:k]
        kth = fin[k - 1][0] if len(fin) == k else inf
        best_live = live[0][0] / float(state.bound[i]) if live else inf
        done = best_live <= kth
        old_kth = old[k - 1][0] if len(old) == k else inf
        merge_decides |= done != (best_live <= old_kth)
        fins.append(fin)
        lives.append([] if done else live)
    return fins, lives, eos_outside, merge_decides


def random_beam_state(generator, n, k, vocab):
    """n sentences of k live hypotheses at a random step, some at their length limit, some with a
    partly filled finished set, some slots empty; logits with <eos> sometimes likely, sometimes not.
    Every score is a random float: no ties."""
    step = int(torch.randint(1, 5, (1,), generator=generator))
    max_len = step + torch.randint(0, 3, (n,), generator=generator)
    alpha = [0.0, 1.0, 1.4][int(torch.randint(0, 3, (1,), generator=generator))]
    tokens = torch.randint(4, vocab, (n * k, step + 1), generator=generator)
    tokens[:, 0] = BOS
    scores = -torch.rand(n, k, generator=generator).mul(4 * step).sort(dim=1, descending=True)[0]
    scores[0, k - 1] = float("-inf")                                      # an empty live slot
    steps = int(max_len.max()) + 1
    fin_tokens = torch.randint(4, vocab, (n, k, steps), generator=generator)
    fin_scores = -torch.rand(n, k, generator=generator).mul(3).sort(dim=1, descending=True)[0]
    for i in range(n):
        filled = int(torch.randint(0, k + 1, (1,), generator=generator))
        fin_scores[i, filled:] = float("-inf")
        fin_tokens[i, filled:] = PAD
        fin_tokens[i, :filled, int(torch.randint(0, steps, (1,), generator=generator)):] = PAD
    logits = torch.randn(n * k, vocab, generator=generator) * 2
    logits[:, [PAD, BOS, UNK]] = float("-inf")
    logits[:, EOS] += torch.randint(-1, 2, (n * k,), generator=generator) * 3.0
    state = BeamState(index=torch.arange(n), max_len=max_len, shortest_limit=int(max_len.min()),
                      bound=length_penalty(max_len + 1, alpha), tokens=tokens, scores=scores,
                      fin_tokens=fin_tokens, fin_scores=fin_scores)
    return state, logits, step, alpha


@pytest.mark.exercise(6)
@pytest.mark.parametrize("beam", [2, 3])
def test_beam_step_matches_its_docstring_written_out_on_random_states(beam):
    # A slow reference of one step (reference_beam_step) against beam_step on 60 random batches of
    # 3 sentences. Among them: <eos> extensions outside the 2k best that would change the finished
    # set if they joined it (only those among the 2k best may), and sentences whose stop test is
    # decided by this step's merge (the k-th finished score after it, not before).
    generator = torch.Generator().manual_seed(beam)
    outside = decided = 0
    for trial in range(60):
        state, logits, step, alpha = random_beam_state(generator, 3, beam, 9)
        fins, lives, eos_outside, merge_decides = reference_beam_step(state, logits, step, beam,
                                                                      alpha)
        outside, decided = outside + eos_outside, decided + merge_decides
        new, rows = beam_step(state, logits.clone(), step, beam, alpha)
        for i, (fin, live) in enumerate(zip(fins, lives)):
            where = f"trial {trial}, sentence {i}"
            fin_scores = new.fin_scores[i].tolist()
            assert fin_scores[:len(fin)] == pytest.approx([f[0] for f in fin], abs=1e-5), where
            assert all(f == float("-inf") for f in fin_scores[len(fin):]), where
            for j, (_, tokens) in enumerate(fin):
                assert [t for t in new.fin_tokens[i, j].tolist() if t != PAD] == tokens, where
            live_scores = new.scores[i].tolist()
            assert live_scores[:len(live)] == pytest.approx([e[0] for e in live], abs=1e-5), where
            assert all(s == float("-inf") for s in live_scores[len(live):]), where
            for j, (_, row, token) in enumerate(live):
                assert int(rows[i * beam + j]) == row, where
                assert new.tokens[i * beam + j].tolist() == state.tokens[row].tolist() + [token]
    assert outside >= 5 and decided >= 5, (outside, decided)


class ChainLM(HistoryLM):
    """A stand-in AR model built for the stop test (vocabulary <pad> <eos> <unk> <bos> 4 5 6): after
    the empty prefix, <eos> has log-probability first_eos[s] and token 4 -1.0 (5 and 6 share the
    rest); after that, token 4 is near-certain until the sentence's limit, where <eos> is. So the
    empty output finishes first, and the output of `limit` 4s finishes last, with about
    -1.0 / penalty(limit + 1): better, and found only by a search that does not stop early."""

    def __init__(self, first_eos, limits):
        self.first_eos, self.limits = first_eos, limits

    def logits(self, sentence, prefix):
        out = torch.full((7,), -9.0)
        out[[PAD, BOS, UNK]] = float("-inf")
        if not prefix:
            rest = math.log((1 - math.exp(self.first_eos[sentence]) - math.exp(-1.0)) / 2)
            out[EOS], out[4], out[5], out[6] = self.first_eos[sentence], -1.0, rest, rest
        else:
            out[4 if len(prefix) < self.limits[sentence] else EOS] = 0.0
        return out

    def step_logits(self, sentence, history):
        rows = zip(sentence.tolist(), history.tolist())
        return torch.stack([self.logits(s, h[1:]) for s, h in rows])

    def next_log_probs(self, sentence, prefixes):
        return torch.stack([self.logits(sentence, p) for p in prefixes]).log_softmax(-1)


@pytest.mark.exercise(6)
def test_an_exact_stop_test_waits_for_a_long_better_output():
    # Beam 1, alpha 1, two sentences with limits of 6 and 3 tokens. After step 0 the empty output
    # has finished (-0.52 and -0.7) and the live 4 scores -1.0: it can still reach
    # -1.0 / ((5 + 7) / 6) = -0.5 and -1.0 / ((5 + 4) / 6) = -0.667, so the search goes on and
    # finds the 4s, the brute-force best. A stop test with a smaller penalty (the current length's,
    # or max_len's without <eos>) stops at step 0 and returns the empty output instead.
    lm = ChainLM(first_eos=[-0.52, -0.7], limits=[6, 3])
    tokens, scores = ar_beam_search(lm, torch.tensor([[0], [1]]), beam=1, alpha=1.0, nbest=1,
                                    max_len=torch.tensor(lm.limits))
    for row, limit in enumerate(lm.limits):
        log_probs = {}

        def normalised(seq):
            total = 0.0
            for i, token in enumerate(seq + (EOS,)):
                if seq[:i] not in log_probs:
                    log_probs[seq[:i]] = lm.next_log_probs(row, [list(seq[:i])])[0].tolist()
                total += log_probs[seq[:i]][token]
            return total / ((5 + len(seq) + 1) / 6)

        outputs = [seq for n in range(limit + 1) for seq in itertools.product([4, 5, 6], repeat=n)]
        best = max(outputs, key=normalised)
        assert list(best) == [4] * limit
        assert [t for t in tokens[row, 0].tolist() if t != PAD] == [4] * limit, f"sentence {row}"
        assert float(scores[row, 0]) == pytest.approx(normalised(best), abs=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_large_beam_finds_the_brute_force_best(alpha):
    # Vocabulary: 4 specials + 3 real tokens; outputs of at most 3 tokens (+ <eos>): 40 sequences.
    model = tiny("ar", vocab_size=7, seed=3)
    src = torch.tensor([[4, 5, 6, 4], [6, 6, 5, PAD]])
    max_len = torch.tensor([3, 3])                            # <eos> forced after 3 tokens
    tokens, scores = ar_beam_search(model, src, beam=64, alpha=alpha, max_len=max_len)
    candidates = [list(seq) for n in range(4) for seq in itertools.product([4, 5, 6], repeat=n)]
    for row in range(2):
        normalised = [sequence_log_prob(model, src[row:row + 1],
                                        c) / float(length_penalty(torch.tensor(len(c) + 1),
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
    # A model that puts almost all mass on <pad>, <bos> and <unk>: decoders must still emit real
    # tokens.
    ar, nar = tiny("ar", seed=8), tiny("nar", seed=8)
    for model in (ar, nar):
        with torch.no_grad():
            model.out_bias[[PAD, BOS, UNK]] = 50.0
    src = torch.randint(4, 20, (4, 6), generator=torch.Generator().manual_seed(5))
    outputs = [ar_greedy(ar, src), ar_beam_search(ar, src, beam=4, nbest=4)[0],
               nar_decode(nar, src), nar_decode(nar, src, odd=False),
               nar_decode(nar, src, length_beam=3, rescorer=ar)]
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
    tokens, scores = ar_beam_search(model, src, beam=8, nbest=8, alpha=1.0,
                                    max_len=torch.tensor([4]))
    seqs = [[t for t in row if t != PAD] for row in tokens[0].tolist()]
    assert len({tuple(s) for s in seqs}) == 8
    assert scores[0].tolist() == sorted(scores[0].tolist(), reverse=True)
    direct = [sequence_log_prob(model, src,
                                s) / float(length_penalty(torch.tensor(len(s) + 1), 1.0))
              for s in seqs]
    assert scores[0].tolist() == pytest.approx(direct, abs=1e-4)


@pytest.mark.parametrize("center, beam, expected", [
    (1, 5, [1, 2, 3, 4, 5]),          # lower edge: the window shifts up, never below length 1
    (2, 5, [1, 2, 3, 4, 5]),
    (8, 5, [6, 7, 8, 9, 10]),         # centred
    (8, 4, [6, 7, 8, 9]),
    # upper edge (max_len 16): shifted down, still 5 distinct lengths
    (15, 5, [12, 13, 14, 15, 16]),
    (16, 9, [8, 9, 10, 11, 12, 13, 14, 15, 16]),
    (16, 1, [16]),
])
@pytest.mark.exercise(5)
def test_length_window_known_answers(center, beam, expected):
    assert length_window(torch.tensor([center]), beam, 16).tolist() == [expected]


@pytest.mark.exercise(5)
@pytest.mark.parametrize("beam, max_len", [(5, 16), (4, 16), (1, 16), (16, 16), (3, 3)])
def test_length_window_of_a_batch_equals_brute_force(beam, max_len):
    # Every sentence its own window, in one call: of all the B consecutive lengths within
    # [1, max_len], the window whose first length is nearest to L - floor(B/2).
    centers = torch.tensor([c for c in (8, 1, 2, max_len - 1, 3, max_len, 9) if 1 <= c <= max_len])
    got = length_window(centers, beam, max_len)
    assert got.shape == (len(centers), beam)
    assert not got.dtype.is_floating_point and got.dtype != torch.bool    # integer lengths, any width
    for row, center in enumerate(centers.tolist()):
        starts = range(1, max_len - beam + 2)
        start = min(starts, key=lambda s: abs(s - (center - beam // 2)))
        assert got[row].tolist() == list(range(start, start + beam)), f"centre {center}"


@pytest.mark.exercise(5)
def test_length_window_stays_on_the_device_of_its_centres():
    # As for ODD: every tensor it makes lies on the device of `center`.
    center = torch.tensor([1, 8, 16, 15])
    with PretendDevice(center):
        got = length_window(center, 5, 16)
    assert on_the_device(got) and got.tolist()[1] == [6, 7, 8, 9, 10]


class TableRescorer:
    """A stand-in AR model for NPD with known scores: log p_AR(y <eos> | x) = sum over y's tokens of
    w[x_0, y_t] + w[x_0, <eos>]. It checks what it is given: sources and PAD-padded targets, one row
    per candidate."""

    def __init__(self):
        self.w = -torch.arange(1.0, 81.0).view(8, 10) / 20

    def score(self, src, tgt):
        assert src.shape[0] == tgt.shape[0] and int(src[:, 0].max()) < 8, "score(src, tokens)"
        tok = self.w[src[:, :1], tgt].masked_fill(tgt == PAD, 0.0).sum(1)
        return tok + self.w[src[:, 0], EOS]

    def by_hand(self, src_row, seq):
        return sum(float(self.w[src_row[0], y]) for y in seq) + float(self.w[src_row[0], EOS])


@pytest.mark.exercise(5)
@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.6])
def test_npd_scores_known_answer(alpha):
    # NPD ranks a NAR candidate y by log p_AR(y <eos> | x) / ((5 + |y| + 1) / 6)^alpha: the penalty
    # counts <eos>, as beam search does for finished outputs, and each row has its own length.
    src = torch.tensor([[1, 9, 9], [5, 9, PAD], [7, 8, 8]])
    tokens = torch.tensor([[4, 5, PAD, PAD], [4, 5, 6, 7], [9, PAD, PAD, PAD]])
    lengths = torch.tensor([2, 4, 1])
    rescorer = TableRescorer()
    got = npd_scores(rescorer, src, tokens, lengths, alpha)
    expected = [rescorer.by_hand(s, [y for y in seq if y != PAD]) / ((5 + n + 1) / 6) ** alpha
                for s, seq, n in zip(src.tolist(), tokens.tolist(), lengths.tolist())]
    assert got.shape == (3,) and got.tolist() == pytest.approx(expected)


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
        out = nar_decode(nar, src, length_beam=5, rescorer=LikesLength(wanted),
                         lengths=torch.tensor([center] * 2))
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
            score = float(ar.score(src[row:row + 1],
                                   cand)) / float(length_penalty(torch.tensor(length + 1), 1.0))
            if score > best_score:
                best, best_score = cand[0].tolist(), score
        got = chosen[row].tolist()
        assert got[:len(best)] == best and all(t == PAD for t in got[len(best):])


def test_npd_scores_each_candidate_with_its_own_source():
    # A stand-in rescorer that wants, for each source, the length its first token says (token - 3):
    # the candidates of a sentence must be scored against that sentence's source, not another's.
    class WantsTheLengthOfItsSource:
        def score(self, src, tokens):
            return torch.where((tokens != PAD).sum(1) == src[:, 0] - 3, 0.0, -100.0)

    nar = tiny("nar", seed=1)
    src = torch.tensor([[7, 5, 6], [11, 4, 9], [9, 9, 9], [8, 4, PAD]])      # wanted: 4, 8, 6, 5
    out = nar_decode(nar, src, length_beam=5, rescorer=WantsTheLengthOfItsSource(),
                     lengths=torch.tensor([6] * 4))
    assert (out != PAD).sum(1).tolist() == [4, 8, 6, 5]


def test_nar_length_beam_without_a_rescorer_picks_by_the_nar_score():
    # Without a rescorer each length candidate is scored by the NAR model itself: log p(T|x) plus
    # its tokens' log-probabilities, each sentence with its own length distribution. The length head
    # is sharpened so that the sentences' length predictions differ and decide the pick.
    nar = tiny("nar", seed=3)
    with torch.no_grad():
        nar.length_head.weight.mul_(8.0)
    src = torch.randint(4, 20, (4, 6), generator=torch.Generator().manual_seed(6))
    center = torch.tensor([5, 6, 7, 8])
    chosen = nar_decode(nar, src, length_beam=3, lengths=center)
    for row in range(4):
        with torch.no_grad():
            enc, keep = nar.encode(src[row:row + 1])
            len_logp = nar.length_logits(enc).float().log_softmax(-1)[0]
        scored = []
        for length in range(int(center[row]) - 1, int(center[row]) + 2):
            cand = nar_decode(nar, src[row:row + 1], lengths=torch.tensor([length]))[:, :length]
            with torch.no_grad():
                logp = nar.decoding_log_probs(nar.nar_logits(torch.tensor([length]), enc,
                                                             keep))[0, :length]
            scored.append((float(len_logp[length] + logp.gather(1, cand[0][:, None]).sum()),
                           cand[0].tolist()))
        best = max(scored)[1]
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
    sources = [torch.randint(4, 20, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 12, (17,), generator=g)]
    batched = translate_ids(model, sources, method=method, beam=4, max_tokens=64)
    single = [translate_ids(model, [s], method=method, beam=4, max_tokens=64)[0] for s in sources]
    assert batched == single


def test_translate_lines_gives_one_output_per_input_line():
    model = tiny("nar", vocab_size=8)
    vocab = Vocab(SPECIALS + ["a", "b", "c", "d"])
    lines = ["a b c", "", "zzz unknown words", "a " * 40, "   "]
    out = translate_lines(lines, model, vocab, None, False)
    assert len(out) == len(lines)
    assert out[1] == "" and out[4] == ""
    assert all(isinstance(o, str) for o in out)


def test_detokenize_known_answers():
    assert detokenize("it &apos;s fine , isn &apos;t it ?") == "it's fine, isn't it?"
    assert detokenize("he said &quot; yes . &quot; ( really )") == 'he said "yes." (really)'


def test_one_candidate_is_a_list_of_one():
    # --candidates 1: the N-best of beam 1 is the beam-1 translation, in the same list-of-lists
    # shape.
    model = tiny("ar", seed=5)
    sources = [[4, 5, 6], [7, 8], [9, 10, 11, 12]]
    assert nbest_ids(model, sources, 1)[0] == [[t]
                                               for t in translate_ids(
                                                   model, sources, method="beam", beam=1)]
    candidates, scores = nbest_ids(model, sources, 3)
    assert [len(c) for c in candidates] == [len(s) for s in scores] == [3, 3, 3]
    assert all(s == sorted(s, reverse=True) for s in scores)
