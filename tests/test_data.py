"""data.py: batching, BPE, reading files with clear errors, and the toy task's oracle."""
import os
import random

import pytest

from data import (BPE, DataError, ToyTask, Vocab, learn_bpe, load_corpus_dir, make_batches,
                  make_toy_corpus, read_parallel, remove_bpe)
from model import SPECIALS, UNK


@pytest.mark.parametrize("seed", range(5))
def test_batches_respect_the_budget_and_lose_no_sentence(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(2000)]
    for shuffle in (None, random.Random(seed)):
        batches = make_batches(lengths, 256, shuffle)
        flat = sorted(i for batch in batches for i in batch)
        assert flat == list(range(len(lengths)))                 # every sentence exactly once
        for batch in batches:
            assert len(batch) * max(lengths[i] for i in batch) <= 256


def test_an_over_budget_sentence_gets_a_batch_of_its_own():
    batches = make_batches([3, 500, 4, 5], 64)
    assert [1] in batches and sorted(i for b in batches for i in b) == [0, 1, 2, 3]


def test_shuffled_batches_differ_between_epochs_but_are_reproducible():
    lengths = [random.Random(1).randint(1, 30) for _ in range(500)]
    a = make_batches(lengths, 128, random.Random(1))
    assert a == make_batches(lengths, 128, random.Random(1))
    assert a != make_batches(lengths, 128, random.Random(2))


@pytest.mark.exercise(9)
def test_bpe_learns_the_classic_merges():
    # Sennrich et al. (2016), Fig. 1: low x5, lower x2, newest x6, widest x3. The end marker is
    # glued to a word's last character, so: e s (9), es t</w> (9), l o (7), then three pairs of
    # "newest" with 6 each (n e, e w, w est</w>), ties going to the smallest pair: e w.
    counts = {"low": 5, "lower": 2, "newest": 6, "widest": 3}
    assert learn_bpe(counts, 4) == [("e", "s"), ("es", "t</w>"), ("l", "o"), ("e", "w")]


def assert_each_merge_is_the_most_frequent_pair(word_counts, merges, num_merges):
    """A check by brute force: recount every pair of the words merged so far before each merge
    (overlapping occurrences too, each word weighted by its count); the merge must be the most
    frequent pair, the smallest of equal ones; merging stops at num_merges or when no pair
    occurs twice."""
    words = {tuple(w[:-1]) + (w[-1] + "</w>",): n for w, n in word_counts.items()}
    for step in range(num_merges + 1):
        counts = {}
        for symbols, n in words.items():
            for pair in zip(symbols, symbols[1:]):
                counts[pair] = counts.get(pair, 0) + n
        best = min(counts, key=lambda pair: (-counts[pair], pair)) if counts else None
        if step == num_merges or best is None or counts[best] < 2:
            assert len(merges) == step, (f"merge {step + 1} of {num_merges}: the most frequent "
                                         f"pair occurs {counts.get(best, 0)} times")
            return
        assert len(merges) > step, f"{len(merges)} merges, but {best} occurs {counts[best]} times"
        got = tuple(merges[step])
        assert got == best, \
            f"merge {step + 1}: {got} ({counts.get(got)}) instead of {best} ({counts[best]})"
        merged = {}
        for symbols, n in words.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i:i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged


@pytest.mark.exercise(9)
@pytest.mark.parametrize("seed", range(4))
def test_bpe_merges_equal_brute_force(seed):
    # Small alphabets, so that counts tie and merges reach across earlier merges; repeated letters
    # (overlapping pairs: a a a a</w>); words seen up to 9 times; more merges asked than can be
    # made.
    rng = random.Random(seed)
    letters = "ab" if seed % 2 else "abcd"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 7))) for _ in range(60)]
    counts = {word: rng.randint(1, 9) for word in words}
    counts["aaaa"] = 3
    given = dict(counts)
    merges = learn_bpe(given, 80)
    assert given == counts, "word_counts is left as given"
    assert_each_merge_is_the_most_frequent_pair(counts, merges, 80)
    assert learn_bpe(dict(counts), 7) == merges[:7]


@pytest.mark.exercise(9)
def test_bpe_boundaries_known_answers():
    assert learn_bpe({}, 5) == []                                      # nothing to learn
    assert learn_bpe({"low": 5, "lower": 2}, 0) == []                  # no merge asked
    assert learn_bpe({"ab": 1, "cd": 1}, 5) == []                      # no pair occurs twice
    assert learn_bpe({"aaaa": 1}, 5) == [("a", "a")]                   # (a, a) twice, then once
    # (a, b) twice (a b a b a b</w>), then every pair once (ab ab a b</w>): 1 merge of the 3 asked
    assert learn_bpe({"ababab": 1}, 3) == [("a", "b")]
    assert learn_bpe({"ba": 2, "ab": 2}, 1) == [("a", "b</w>")]       # a tie: the smallest pair


@pytest.mark.exercise(9)
def test_bpe_encoding_then_removal_restores_the_text():
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 9))) for _ in range(300)]
    sentences = [[rng.choice(words) for _ in range(rng.randint(1, 12))] for _ in range(400)]
    bpe = BPE.learn(sentences, 200)
    assert len(bpe.merges) == 200
    unseen = [["zebra", "a", "hgfedcba", "x"]]
    for sent in sentences + unseen:
        pieces = bpe.encode(sent)
        assert remove_bpe(" ".join(pieces)) == " ".join(sent)
    assert len(bpe.encode(sentences[0])) < sum(len(w) for w in sentences[0])  # it does compress


def test_bpe_saves_and_loads(tmp_path):
    bpe = BPE.learn([["hello", "world", "hello"]], 5)
    bpe.save(tmp_path / "codes")
    assert BPE.load(tmp_path / "codes").merges == bpe.merges


def test_vocab_round_trip_and_unknown_words(tmp_path):
    vocab = Vocab.build([["b", "a", "b"], ["c"]])
    assert vocab.itos[:4] == SPECIALS and vocab.itos[4] == "b"
    assert vocab.encode(["a", "zzz"]) == [vocab.stoi["a"], UNK]
    vocab.save(tmp_path / "v.txt")
    assert Vocab.load(tmp_path / "v.txt").itos == vocab.itos


def write(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)
    return str(path)


def test_mismatched_line_counts_name_both_files(tmp_path):
    src, tgt = write(tmp_path / "a.de", "a\nb\nc\n"), write(tmp_path / "a.en", "x\ny\n")
    with pytest.raises(DataError, match=r"a\.de has 3 lines but .*a\.en has 2"):
        read_parallel(src, tgt)


def test_invalid_utf8_names_file_and_line(tmp_path):
    src = write(tmp_path / "b.de", b"ok\nfine\nbad \xff byte\n", "wb")
    tgt = write(tmp_path / "b.en", "1\n2\n3\n")
    with pytest.raises(DataError, match=r"b\.de:3: not valid UTF-8"):
        read_parallel(src, tgt)


def test_missing_file_and_missing_split(tmp_path):
    with pytest.raises(DataError, match=r"nope\.de: file not found"):
        read_parallel(str(tmp_path / "nope.de"), str(tmp_path / "nope.en"))
    write(tmp_path / "valid.de", "a\n")
    write(tmp_path / "valid.en", "b\n")
    with pytest.raises(DataError, match=r"train\.de: missing"):
        load_corpus_dir(str(tmp_path), "de", "en", 0, 50, log=lambda *_: None)


def test_empty_and_overlong_pairs_are_dropped_and_counted(tmp_path):
    src = write(tmp_path / "c.de", "a b\n\nc d e f g\nh\n")
    tgt = write(tmp_path / "c.en", "x\ny\nz\n \n")
    pairs, empty = read_parallel(src, tgt)
    assert pairs == [(["a", "b"], ["x"]), (["c", "d", "e", "f", "g"], ["z"])] and empty == 2
    for split in ("train", "valid"):
        write(tmp_path / f"{split}.de", "a b\n\nc d e f g\nh\n")
        write(tmp_path / f"{split}.en", "x\ny\nz\n \n")
    messages = []
    corpus = load_corpus_dir(str(tmp_path), "de", "en", 0, 4, log=messages.append)
    # the 5-token source is over --max-len 4
    assert corpus.train == [(["a", "b"], ["x"])]
    assert len(corpus.valid) == 2                                  # evaluation keeps long sentences
    assert any("2 pairs with an empty side dropped" in m for m in messages)
    assert any("dropped 1 pairs longer than 4" in m for m in messages)


def test_toy_task_lists_six_valid_translations_without_repeats():
    task, rng = ToyTask(), random.Random(0)
    for src, tgt in task.sample_pairs(200, rng):
        valid = task.valid_translations(src)
        assert len(set(valid)) == 6
        assert " ".join(tgt) in valid
        for sentence in valid:
            words = sentence.split()
            assert all(a != b for a, b in zip(words, words[1:]))
        lengths = sorted(len(v.split()) for v in valid)
        assert lengths[2:] == [lengths[2]] * 4 and lengths[0] == lengths[1] == lengths[2] - 1


def test_toy_corpus_is_reproducible_from_its_seed():
    a, b = make_toy_corpus(seed=3, train_size=50), make_toy_corpus(seed=3, train_size=50)
    assert a.train == b.train and a.vocab.itos == b.vocab.itos
    assert make_toy_corpus(seed=4, train_size=50).train != a.train


SHARED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared",
                      "data", "iwslt14.de-en")


@pytest.mark.skipif(not os.path.isdir(SHARED),
                    reason="../shared/data/iwslt14.de-en is absent (real data lives "
                                                      "outside the repository)")
def test_bpe_on_real_iwslt_text_round_trips_and_compresses():
    pairs, empty = read_parallel(os.path.join(SHARED, "valid.de"), os.path.join(SHARED, "valid.en"))
    assert len(pairs) == 500 and empty == 0
    sentences = [s for s, _ in pairs] + [t for _, t in pairs]
    bpe = BPE.learn(sentences, 1000)
    pieces = [bpe.encode(s) for s in sentences]
    assert all(remove_bpe(" ".join(p)) == " ".join(s) for p, s in zip(pieces, sentences))
    # Greedy BPE's first k merges are the k-merge model: more merges, fewer subwords.
    counts = [sum(len(BPE(bpe.merges[:k]).encode(s)) for s in sentences) for k in (0, 300, 1000)]
    words = sum(map(len, sentences))
    assert counts[0] > counts[1] > counts[2] > words
    assert counts[2] == sum(map(len, pieces))
