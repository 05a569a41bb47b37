"""decode.py against brute force: ODD Viterbi, beam search, greedy, NAR length beam + rescoring,
and batched decoding equal to decoding one sentence at a time."""
import itertools

import pytest
import torch

from decode import (ar_beam_search, ar_greedy, detokenize, length_penalty, nar_decode, odd_viterbi,
                    translate_ids, translate_lines, build_parser)
from data import Vocab
from model import PAD, ModelConfig, Transformer, SPECIALS

torch.set_num_threads(2)


def tiny(kind, vocab_size=20, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, kind=kind, d_model=32, n_heads=4, d_ff=64, enc_layers=2,
                      dec_layers=2, dropout=0.0, max_len=16, **kw)
    model = Transformer(cfg).eval()
    with torch.no_grad():                                     # sharper distributions than at init
        model.embed.weight.mul_(4.0)
    return model


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


def test_odd_removes_a_repeat_that_argmax_makes():
    logp = torch.full((1, 3, 7), -10.0)
    logp[0, 0, 4] = -0.1                                       # position 0: 4
    logp[0, 1, 4], logp[0, 1, 5] = -0.1, -0.5                  # position 1: 4, then 5
    logp[0, 2, 6] = -0.1                                       # position 2: 6
    tokens, score = odd_viterbi(logp, torch.tensor([3]))
    assert logp.argmax(-1).tolist() == [[4, 4, 6]]
    assert tokens.tolist() == [[4, 5, 6]]
    assert abs(float(score) - (-0.7)) < 1e-6


def test_beam_one_equals_greedy():
    model = tiny("ar")
    src = torch.randint(4, 20, (6, 7), generator=torch.Generator().manual_seed(1))
    src[2, 4:] = PAD
    greedy = ar_greedy(model, src)
    beam, _ = ar_beam_search(model, src, beam=1)
    width = max(greedy.size(1), beam.size(2))
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.size(-1)), value=PAD)
    assert torch.equal(pad(greedy), pad(beam[:, 0]))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_large_beam_finds_the_brute_force_best(alpha):
    # Vocabulary: 4 specials + 3 real tokens; outputs of at most 3 tokens (+ <eos>): 40 sequences.
    model = tiny("ar", vocab_size=7, seed=3)
    src = torch.tensor([[4, 5, 6, 4], [6, 6, 5, PAD]])
    max_len = torch.tensor([4, 4])                            # <eos> forced at the 4th step at the latest
    tokens, scores = ar_beam_search(model, src, beam=64, alpha=alpha, max_len=max_len)
    for row in range(2):
        candidates = [list(seq) for n in range(4) for seq in itertools.product([4, 5, 6], repeat=n)]
        tgt = torch.full((len(candidates), 3), PAD)
        for i, seq in enumerate(candidates):
            tgt[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        logp = model.score(src[row:row + 1].expand(len(candidates), -1), tgt)
        lengths = torch.tensor([len(c) + 1 for c in candidates])
        normalised = logp / length_penalty(lengths, alpha)
        best = candidates[int(normalised.argmax())]
        found = [t for t in tokens[row, 0].tolist() if t != PAD]
        assert found == best
        assert abs(float(scores[row, 0]) - float(normalised.max())) < 1e-4


def test_nbest_is_sorted_distinct_and_scored_right():
    model = tiny("ar", vocab_size=7, seed=3)
    src = torch.tensor([[4, 5, 6, 4]])
    tokens, scores = ar_beam_search(model, src, beam=8, nbest=8, alpha=1.0, max_len=torch.tensor([5]))
    seqs = [tuple(t for t in row if t != PAD) for row in tokens[0].tolist()]
    assert len(set(seqs)) == 8
    assert scores[0].tolist() == sorted(scores[0].tolist(), reverse=True)
    tgt = torch.nn.utils.rnn.pad_sequence([torch.tensor(s, dtype=torch.long) for s in seqs], batch_first=True,
                                          padding_value=PAD)
    direct = model.score(src.expand(8, -1), tgt) / length_penalty(torch.tensor([len(s) + 1 for s in seqs]), 1.0)
    assert torch.allclose(direct, scores[0], atol=1e-4)


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
