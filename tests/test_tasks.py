"""The family of embedded tasks (data.TASKS): every task's oracle (valid_translations, mode) against
a slow brute-force reference, the knobs doing what they say, and the default task "toy"
unchanged."""
import hashlib
import json
import math
import random
from collections import Counter, defaultdict

import pytest

from data import (TASKS, TOY_CLOSING, TOY_LEXICON, TOY_OPENING, DataError, TaskSpec, ToyTask,
                  make_toy_corpus)

REGISTERS, FRAMINGS = ("formal", "casual"), ("none", "opening", "closing")


def reference_translations(spec, src):
    """Brute force: every register x framing, built word by word from the knob's definition, in the
    documented order (register outer, framing inner)."""
    out = []
    for register in REGISTERS:
        column = 1 if register == "formal" else 2
        phrases = [next(entry[column] for entry in TOY_LEXICON if entry[0] == w) for w in src]
        n = len(phrases)
        for framing in FRAMINGS:
            word = {"opening": TOY_OPENING[register], "closing": TOY_CLOSING[register]}.get(framing)
            before, after = {}, {}                    # concept index -> word put before / after it
            if spec.framing_positions == "slots":
                before[0] = word if framing == "opening" else "."
                after[n - 1] = word if framing == "closing" else "."
            elif framing != "none":
                inline = spec.framing_positions == "inline"
                if framing == "opening":
                    before = {i: word for i in (range(0, n, 3) if inline else [0])}
                else:
                    after = {i: word for i in (range(n - 1, -1, -3) if inline else [n - 1])}
            sequence = []
            for i, phrase in enumerate(phrases):
                sequence += [before[i]] if i in before else []
                sequence += [phrase] + ([after[i]] if i in after else [])
            out.append(" ".join(sequence))
    return out


def mixed_register(spec, src, reference):
    """The casual plain translation with its first concept in the formal register."""
    entry = next(e for e in TOY_LEXICON if e[0] == src[0])
    words, start = reference[3].split(), int(spec.framing_positions == "slots")
    return words[:start] + entry[1].split() + words[start + len(entry[2].split()):]


def pair_digest(corpus):
    blob = json.dumps([corpus.train, corpus.valid, corpus.test, corpus.vocab.itos]).encode()
    return hashlib.sha256(blob).hexdigest()


# Computed from data.py before the task family existed (commit ca83b32): make_toy_corpus(seed, 300,
# 50, 50).
OLD_TOY_DIGESTS = {1: "d37a3bde0b104f73ab216d001929892cc3f5c51821e7f783be31dc30920c937d",
                   3: "b05249aa607e9d95b5cc89296fae467cc10b2279bffd108c1d29de85412248c3"}


@pytest.mark.parametrize("seed", sorted(OLD_TOY_DIGESTS))
def test_the_toy_task_reproduces_the_old_corpus_exactly(seed):
    named = make_toy_corpus(seed=seed, train_size=300, valid_size=50, test_size=50, task="toy")
    default = make_toy_corpus(seed=seed, train_size=300, valid_size=50, test_size=50)
    assert pair_digest(named) == pair_digest(default) == OLD_TOY_DIGESTS[seed]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_valid_translations_and_mode_match_brute_force(task):
    toy, rng = ToyTask(TASKS[task]), random.Random(7)
    sources = [toy.sample_source(rng) for _ in range(300)]
    # short ones: edge cases
    sources += [[w for w, _, _ in TOY_LEXICON][:k] for k in (1, 2, 3, 4)]
    for src in sources:
        reference = reference_translations(TASKS[task], src)
        assert toy.valid_translations(src) == reference and len(set(reference)) == 6
        for index, text in enumerate(reference):
            assert toy.mode(src, text.split()) == index
        if len(src) > 1:                                     # a mixed-register output is invalid
            assert toy.mode(src, mixed_register(TASKS[task], src, reference)) is None
        assert toy.mode(src, reference[0].split()[:-1]) is None


@pytest.mark.parametrize("task", sorted(TASKS))
def test_clean_targets_are_valid_noisy_ones_invalid_at_the_knobs_share(task):
    spec, n = TASKS[task], 2000
    corpus = make_toy_corpus(seed=5, train_size=n, valid_size=200, test_size=200, task=task)
    for split in (corpus.valid, corpus.test):                 # references are always valid
        for src, tgt in split:
            assert corpus.toy.mode(src,
                                   tgt) == reference_translations(spec, src).index(" ".join(tgt))
    invalid = 0
    for src, tgt in corpus.train:
        reference = reference_translations(spec, src)
        if " ".join(tgt) in reference:
            assert corpus.toy.mode(src, tgt) == reference.index(" ".join(tgt))
            continue
        invalid += 1
        assert corpus.toy.mode(src, tgt) is None
        assert any(one_edit_apart(tgt, r.split()) for r in reference)   # a near miss, not garbage
    tolerance = 4 * math.sqrt(spec.noise * (1 - spec.noise) / n)
    assert abs(invalid / n - spec.noise) <= tolerance, (invalid, n, spec.noise)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_a_corrupted_target_is_always_an_invalid_near_miss(task):
    # Short sources make the edits that leave a target valid likely (dropping its framing word).
    toy, rng = ToyTask(TASKS[task]), random.Random(11)
    for src in ([w for w, _, _ in TOY_LEXICON][:k] for k in (2, 3, 4) for _ in range(40)):
        for text in toy.valid_translations(src):
            noisy = toy.corrupt(src, text.split(), rng)
            assert toy.mode(src, noisy) is None and one_edit_apart(noisy, text.split())


def one_edit_apart(noisy, valid):
    """noisy is valid with one word dropped, or with two adjacent words swapped."""
    drops = any(noisy == valid[:i] + valid[i + 1:] for i in range(len(valid)))
    swaps = any(noisy == valid[:i] + [valid[i + 1], valid[i]] + valid[i + 2:]
                for i in range(len(valid) - 1))
    return drops or swaps


@pytest.mark.parametrize("task", [t for t in sorted(TASKS) if TASKS[t].mode_rule != "uniform"])
def test_deterministic_rules_give_a_source_the_same_mode_every_time(task):
    toy = ToyTask(TASKS[task])
    for src in (toy.sample_source(random.Random(seed)) for seed in range(200)):
        modes = {toy.target_mode(src, (r, f)) for r in REGISTERS for f in FRAMINGS}
        assert len(modes) == 1                                # whatever the generator drew
    corpus = make_toy_corpus(seed=2, train_size=500, task=task)
    for src, tgt in corpus.train + corpus.test:
        register, framing = toy.target_mode(src, None)
        assert toy.mode(src, tgt) == REGISTERS.index(register) * 3 + FRAMINGS.index(framing)
    # Fixed values: the hash must not depend on the process (Python's hash() of a str would).
    rule_modes = [ToyTask(TASKS[task]).target_mode(["ka", "lu", "mo", "ne"], None)
                  for _ in range(2)]
    assert rule_modes[0] == rule_modes[1] == {"source-hash": ("casual", "opening"),
                                              "first-word": ("formal",
                                                             "none")}[TASKS[task].mode_rule]


def first_word_predictability(corpus):
    """The share of training targets whose mode the majority mode of their first source word
    predicts."""
    modes = defaultdict(Counter)
    for src, tgt in corpus.train:
        modes[src[0]][corpus.toy.mode(src, tgt)] += 1
    return sum(c.most_common(1)[0][1] for c in modes.values()) / len(corpus.train)


def test_first_word_mode_is_predictable_from_the_first_word_alone_and_the_others_are_not():
    shares = {task: first_word_predictability(make_toy_corpus(seed=3, train_size=3000, task=task))
              for task in ("toy", "toy-hashed", "toy-learnable")}
    assert shares["toy-learnable"] == 1.0
    # chance is 1/6, plus small-count luck
    assert shares["toy"] < 0.3 and shares["toy-hashed"] < 0.3
    counts = Counter(corpus_mode for corpus_mode in (ToyTask(TASKS["toy-hashed"]).target_mode(
        ToyTask().sample_source(random.Random(s)), None) for s in range(3000)))
    # the hash spreads over all six modes
    assert len(counts) == 6 and min(counts.values()) > 3000 / 6 * 0.8


def test_framing_positions_change_shifts_and_the_number_of_marked_positions():
    src = ["ka", "lu", "mo", "ne", "pi", "ro", "su"]                       # 7 one-word concepts
    edge, inline, slots = (ToyTask(TaskSpec("t", framing_positions=p)).valid_translations(src)
                           for p in ("edge", "inline", "slots"))
    lengths = lambda texts: [len(t.split()) for t in texts]
    # a framing word shifts the rest
    assert lengths(edge) == [7, 8, 8] * 2
    # ceil(7/3) = 3 framing words
    assert lengths(inline) == [7, 10, 10] * 2
    assert lengths(slots) == [9] * 6                                        # nothing shifts
    # framings differ in 1-2 slots
    for register in (0, 3):
        plain = slots[register].split()
        assert [sum(a != b
                    for a, b in zip(plain, slots[register + f].split())) for f in (1, 2)] == [1, 1]
    assert inline[1].split().count("furthermore") == 3 and inline[5].split().count("okay") == 3


def test_the_registry_names_describes_and_checks_its_tasks():
    assert {"toy", "toy-learnable", "toy-hashed", "toy-noisy", "toy-shift-free"} <= set(TASKS)
    assert all(spec.about for spec in TASKS.values())
    assert any(spec.noise > 0 for spec in TASKS.values())
    with pytest.raises(DataError, match="toy-learnable"):
        make_toy_corpus(task="no-such-task")
    with pytest.raises(ValueError, match="mode_rule"):
        TaskSpec("bad", mode_rule="sometimes")
    with pytest.raises(ValueError, match="noise"):
        TaskSpec("bad", noise=1.5)
    # the task's own default
    small = make_toy_corpus(seed=1, task="toy-small", valid_size=5, test_size=5)
    assert len(small.train) == TASKS["toy-small"].train_size
    assert make_toy_corpus(seed=1, train_size=20, task="toy-noisy").name == "toy-noisy (seed 1)"


def test_a_seed_gives_the_same_sources_in_every_task():
    sources = [[s for s, _ in make_toy_corpus(seed=4, train_size=200, task=task).train]
               for task in TASKS]
    assert all(s == sources[0] for s in sources)
