"""data.py: text in, padded tensors out (the data side of the paper's experiments; docs/method.md).

- `Vocab`: the joint source/target vocabulary, special tokens first (<pad> <eos> <unk> <bos>).
- `read_parallel`: a pair of aligned text files, one sentence per line, with clear one-line errors.
- `BPE`: a from-scratch joint byte-pair-encoding learner and encoder (Sennrich et al. 2016) that
  writes the "@@ " continuation markers fairseq's preparation scripts produce.
- `make_batches` / `collate`: token-budget batching (sorted by length, shuffled buckets) and
  padding.
- `ToyTask`: the embedded default dataset, generated from a seed. Every source sentence has six
  valid translations that differ in choices correlated across the whole sentence (a register that
  picks one of two synonym sets, and an optional opening or closing word that shifts every
  position), so a NAR model trained on the raw data mixes modes and an AR model does not. It lists
  all valid translations of a source, for exact evaluation.
- `TaskSpec` / `TASKS`: a family of named embedded tasks ("toy" is the default above) whose knobs
  turn the mechanisms the paper's E-step relies on on and off: whether the training target's mode is
  a function of the source the NAR model can learn (`mode_rule`), at how many positions a mode shows
  and whether it shifts later ones (`framing_positions`), how many training targets are invalid,
  i.e. how good the AR teacher and its candidate set Q can be (`noise`), and the training-set size.
  Every task keeps six valid translations per source, so the oracle stays exact.
- `make_toy_corpus(seed, ..., task)`: the corpus of a named task; `load_corpus_dir`: a corpus
  directory in the fairseq layout (train/valid/test.{src,tgt}).
"""
import hashlib
import heapq
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from model import PAD, SPECIALS, UNK, write_atomic


class DataError(ValueError):
    """A problem with the user's data, worded as one line: file, line, problem, what to do."""


# ------------------------------------------------------------------------------------------------
# Vocabulary
# ------------------------------------------------------------------------------------------------
class Vocab:
    def __init__(self, tokens):
        self.itos = list(tokens)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        if self.itos[:len(SPECIALS)] != SPECIALS:
            raise DataError(f"a vocabulary must start with {' '.join(SPECIALS)}")

    @classmethod
    def build(cls, sentences):
        """Joint vocabulary of the tokenised sentences (source and target together), most frequent
        first."""
        counts = Counter(tok for sent in sentences for tok in sent)
        for special in SPECIALS:
            counts.pop(special, None)
        return cls(SPECIALS + [t
                               for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))])

    def __len__(self):
        return len(self.itos)

    def encode(self, tokens):
        return [self.stoi.get(t, UNK) for t in tokens]

    def decode(self, ids):
        """Ids -> tokens, stopping at nothing: callers pass real tokens only (no PAD/EOS/BOS)."""
        return [self.itos[i] for i in ids]

    def save(self, path):
        write_atomic(path, "\n".join(self.itos) + "\n")

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls(line.rstrip("\n") for line in f)


# ------------------------------------------------------------------------------------------------
# Reading parallel text
# ------------------------------------------------------------------------------------------------
def read_lines(path):
    """Lines of a UTF-8 text file; a one-line DataError naming file and line on any problem."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (expected one sentence per line)")
    with open(path, "rb") as f:
        raw = f.read().split(b"\n")
    if raw and raw[-1] == b"":
        raw.pop()                                     # the newline that ends the last line
    lines = []
    for number, line in enumerate(raw, start=1):
        try:
            lines.append(line.decode("utf-8").rstrip("\r"))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}:{number}: not valid UTF-8 (byte {err.start}); "
                            f"convert the file to UTF-8, e.g. with iconv") from None
    return lines


def read_parallel(src_path, tgt_path):
    """Aligned (source tokens, target tokens) pairs and the number of pairs dropped because a side
    is empty (counted, never silent). A line-count mismatch is an error, because it means every
    later pair would be misaligned."""
    numbered, lines = read_numbered_parallel(src_path, tgt_path)
    return [(s, t) for _, s, t in numbered], lines - len(numbered)


def read_numbered_parallel(src_path, tgt_path):
    """(line index, source tokens, target tokens) of the pairs with no empty side, and the number of
    lines: a file aligned with train.SRC (precomputed targets) can then be matched to the pairs
    kept."""
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise DataError(f"{src_path} has {len(src_lines)} lines but {tgt_path} has "
                        f"{len(tgt_lines)}: "
                        f"source and target must be aligned line by line")
    numbered = [(i, s.split(), t.split()) for i, (s, t) in enumerate(zip(src_lines, tgt_lines))]
    return [(i, s, t) for i, s, t in numbered if s and t], len(src_lines)


# ------------------------------------------------------------------------------------------------
# Byte-pair encoding (Sennrich et al. 2016), joint over source and target
# ------------------------------------------------------------------------------------------------
END = "</w>"      # marks a word's last symbol while learning; shown as the absence of "@@" in text


def word_pairs(symbols):
    return zip(symbols, symbols[1:])


def merge_symbols(symbols, pair):
    """Replace every adjacent occurrence of `pair` in the tuple `symbols` by the joined symbol."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def learn_bpe(word_counts, num_merges):
    """The `num_merges` most frequent adjacent symbol pairs, merged greedily one after another.
    word_counts: {word: count}. A word starts as its characters, END glued to the last one ("low"
    -> l o w</w>). A pair's count is its number of adjacent occurrences over all words, each word
    weighted by its count (overlapping ones too: a a a a</w> holds (a, a) twice). Each step merges
    the most frequent pair in every word (merge_symbols) and counts again on the merged words; of
    equal counts the smallest pair wins (min over (-count, pair)). It stops early when no pair
    occurs twice. word_counts is left as given. Returns the merges, a list of pairs, in the order
    learned.
    Incremental: a pair's count is updated only in the words that contain it, and a lazy max-heap
    finds the most frequent pair, so 10k merges over IWSLT-sized text take minutes, not hours."""
    # >>> exercise 9: learning BPE merges
    words = [tuple(w[:-1]) + (w[-1] + END,) for w in word_counts]
    freqs = list(word_counts.values())
    pair_count, pair_words = Counter(), defaultdict(set)
    for index, (symbols, freq) in enumerate(zip(words, freqs)):
        for pair in word_pairs(symbols):
            pair_count[pair] += freq
            pair_words[pair].add(index)
    heap = [(-count, pair) for pair, count in pair_count.items()]
    heapq.heapify(heap)
    merges = []
    while heap and len(merges) < num_merges:
        neg_count, pair = heapq.heappop(heap)
        if pair_count.get(pair, 0) != -neg_count:
            continue                                  # stale entry: the count changed since
        if -neg_count < 2:
            break                                     # no pair occurs twice: nothing left to learn
        merges.append(pair)
        changed = set()
        for index in pair_words.pop(pair):
            old, freq = words[index], freqs[index]
            new = merge_symbols(old, pair)
            for p in word_pairs(old):
                pair_count[p] -= freq
                changed.add(p)
            for p in word_pairs(new):
                pair_count[p] += freq
                pair_words[p].add(index)
                changed.add(p)
            words[index] = new
        del pair_count[pair]
        changed.discard(pair)
        for p in changed:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
    return merges
    # <<< exercise 9


class BPE:
    """Encodes words into learned subwords; every subword but a word's last carries "@@"."""

    def __init__(self, merges):
        self.merges = [tuple(m) for m in merges]
        self.rank = {pair: i for i, pair in enumerate(self.merges)}
        self.cache = {}

    @classmethod
    def learn(cls, sentences, num_merges):
        return cls(learn_bpe(Counter(w for s in sentences for w in s), num_merges))

    def encode_word(self, word):
        if word not in self.cache:
            symbols = tuple(word[:-1]) + (word[-1] + END,)
            while len(symbols) > 1:                   # apply the earliest-learned merge first
                pair = min(word_pairs(symbols), key=lambda p: self.rank.get(p, len(self.rank)))
                if pair not in self.rank:
                    break
                symbols = merge_symbols(symbols, pair)
            pieces = [s + "@@" for s in symbols[:-1]] + [symbols[-1][:-len(END)]]
            self.cache[word] = [p for p in pieces if p not in ("", "@@")]
        return self.cache[word]

    def encode(self, tokens):
        return [piece for word in tokens for piece in self.encode_word(word)]

    def save(self, path):
        write_atomic(path, "".join(f"{a} {b}\n" for a, b in self.merges))

    @classmethod
    def load(cls, path):
        merges = []
        for number, line in enumerate(read_lines(path), start=1):
            parts = line.split(" ")
            if len(parts) != 2:
                raise DataError(f"{path}:{number}: expected a merge 'left right', got {line!r}")
            merges.append(tuple(parts))
        return cls(merges)


def remove_bpe(text):
    """Undo "@@ " continuation markers: 'wunder@@ bar' -> 'wunderbar'."""
    return (text + " ").replace("@@ ", "").rstrip()


# ------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------
def make_batches(lengths, max_tokens, rng=None):
    """Group sentence indices into batches of at most `max_tokens` padded tokens
    (batch size x longest sentence in it), sorting by length so that little is padding.
    With `rng` (a random.Random) equal lengths are ordered randomly and the batch order is shuffled,
    giving different buckets every epoch. A sentence longer than max_tokens gets a batch of its
    own."""
    order = list(range(len(lengths)))
    if rng is not None:
        rng.shuffle(order)
    order.sort(key=lambda i: lengths[i])              # stable: shuffled ties stay shuffled
    batches, current, longest = [], [], 0
    for i in order:
        new_longest = max(longest, lengths[i])
        if current and new_longest * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, new_longest = [], lengths[i]
        current.append(i)
        longest = new_longest
    if current:
        batches.append(current)
    if rng is not None:
        rng.shuffle(batches)
    return batches


def pad_batch(seqs, device="cpu"):
    """List of id lists -> (batch, longest) long tensor, right-padded with PAD."""
    out = np.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=np.int64)
    for row, seq in enumerate(seqs):
        out[row, :len(seq)] = seq
    batch = torch.from_numpy(out)
    if torch.device(device).type == "cuda":
        # From pinned host memory the copy runs in the background: the host goes on queueing work
        # instead of waiting for it (torch keeps the pinned buffer until the copy is done).
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def collate(pairs, device="cpu"):
    """[(src ids, tgt ids), ...] -> src (batch, src_len), tgt (batch, tgt_len) on `device`."""
    return pad_batch([p[0] for p in pairs], device), pad_batch([p[1] for p in pairs], device)


# ------------------------------------------------------------------------------------------------
# The embedded default: a generated translation task with real multi-modality
# ------------------------------------------------------------------------------------------------
# (source word, formal English, casual English); a few concepts take two or three target words, as
# many in both registers, so the target length differs from the source length (it must be predicted)
# but does not reveal the register.
TOY_LEXICON = [
    ("ka", "purchase", "buy"), ("lu", "residence", "home"), ("mo", "automobile", "car"),
    ("ne", "commence", "start"), ("pi", "assist", "help"), ("ro", "sufficient", "enough"),
    ("su", "inquire", "ask"), ("ta", "children", "kids"), ("vo", "observe", "see"),
    ("wi", "require", "need"), ("za", "attempt", "try"), ("bo", "reside", "live"),
    ("de", "numerous", "many"), ("fi", "obtain", "get"), ("gu", "depart", "leave"),
    ("ha", "commerce", "trade"), ("ji", "beverage", "drink"), ("ko", "currently", "now"),
    ("le", "physician", "doctor"), ("ma", "utilize", "use"), ("no", "employment", "work"),
    ("pe", "inform", "tell"), ("ri", "at once", "right away"),
    ("sa", "a great deal", "a whole lot"), ("ti", "additionally", "also"),
    ("ve", "at present", "these days"), ("we", "conclude", "finish"),
    ("xo", "prior to", "ahead of"), ("yu", "subsequently", "later"), ("zi", "residents", "folks"),
]
# The framing word: opening or closing, in the register of the sentence; SLOT fills an empty framing
# slot.
TOY_OPENING = {"formal": "furthermore", "casual": "so"}
TOY_CLOSING = {"formal": "indeed", "casual": "okay"}
TOY_SLOT = "."


@dataclass(frozen=True)
class TaskSpec:
    """The knobs of one embedded task. Every task keeps the same 6 valid translations per source
    (register x framing), so the oracle and every mode measure stay exact; the knobs change which
    one is the training target, where a mode shows in it, and how clean the training data is.

    mode_rule: how the mode of a target depends on its source, i.e. whether the teacher's mode
      choice is something the NAR student can predict (the paper's E-step removes only
      multi-modality it cannot).
      "uniform": drawn at random, independent of the source; the raw data is multi-modal per
        source, but an AR teacher's beam output is a deterministic function of the source, which
        the NAR may learn.
      "source-hash": a hash of the whole source: one mode per source, but no pattern a small model
        can learn, so distilled targets stay multi-modal to the student unless it memorises them.
      "first-word": the lexicon position of the first source word, modulo 6: one look-up, learnable.
    framing_positions: where the framing shows, i.e. how many target positions a mode choice
      touches.
      "edge": an optional opening or closing word (shifts every later position, shows at one).
      "inline": the framing word before (opening) or after (closing) every third concept, counted
        from that edge: shows at ceil(n/3) positions and shifts the positions after each.
      "slots": every target has an opening and a closing slot, TOY_SLOT where unused: a mode changes
        one position and shifts none (all 6 translations have the same length).
    noise: the share of training targets made invalid (a word dropped or two adjacent words
      swapped), so the AR teacher learns some invalid outputs and Q, its N-best within a margin,
      holds some.
    train_size: the default number of training pairs (the data size against the model:
      memorisation)."""
    about: str
    mode_rule: str = "uniform"
    framing_positions: str = "edge"
    noise: float = 0.0
    train_size: int = 6000

    def __post_init__(self):
        for knob, allowed in (("mode_rule", ("uniform", "source-hash", "first-word")),
                              ("framing_positions", ("edge", "inline", "slots"))):
            value = getattr(self, knob)
            if value not in allowed:
                raise ValueError(f"TaskSpec.{knob} must be one of {', '.join(allowed)}, not "
                                 f"{value!r}")
        if not 0 <= self.noise < 1:
            raise ValueError(f"TaskSpec.noise is a share of training targets in [0, 1), not "
                             f"{self.noise}")


TASKS = {
    "toy": TaskSpec("the default: random mode per pair, optional opening/closing word, clean data"),
    "toy-learnable": TaskSpec("the mode is a function of the first source word (learnable by the "
                              "NAR)", mode_rule="first-word"),
    "toy-hashed": TaskSpec("the mode is a hash of the whole source (determined, but not learnable)",
                           mode_rule="source-hash"),
    "toy-inline": TaskSpec("the framing word recurs every third concept (a mode shows at several "
                           "positions)", framing_positions="inline"),
    "toy-shift-free": TaskSpec("fixed framing slots: a mode changes positions but never shifts "
                               "them", framing_positions="slots"),
    "toy-noisy": TaskSpec("15% of training targets invalid (a weaker AR teacher, invalid "
                          "candidates in Q)", noise=0.15),
    "toy-small": TaskSpec("today's task with 1500 training pairs (more memorisation per pair)",
                          train_size=1500),
}


class ToyTask:
    """Source sentences are random sequences of 4..10 concept words (no word twice in a row);
    a translation picks a register (formal / casual synonyms for every word) and a framing
    (none / opening / closing): 6 valid translations. Under the default knobs (task "toy") both are
    drawn independently and uniformly, and 2 of the 6 are as long as the plain one plus one word, so
    even a known length leaves them ambiguous. `spec` (a TaskSpec) sets the knobs."""

    REGISTERS = ("formal", "casual")
    FRAMINGS = ("none", "opening", "closing")

    def __init__(self, spec=None, min_words=4, max_words=10):
        self.spec = spec or TASKS["toy"]
        self.min_words, self.max_words = min_words, max_words
        self.lexicon = {src: {"formal": formal, "casual": casual}
                        for src, formal, casual in TOY_LEXICON}
        # for "first-word"
        self.word_class = {src: i % 6 for i, (src, _, _) in enumerate(TOY_LEXICON)}

    def sample_source(self, rng):
        words = []
        while len(words) < rng.randint(self.min_words, self.max_words) or not words:
            word = rng.choice(TOY_LEXICON)[0]
            if not words or word != words[-1]:
                words.append(word)
        return words

    def translate(self, src, register, framing):
        phrases = [self.lexicon[w][register] for w in src]             # one phrase per concept
        opening, closing, n = TOY_OPENING[register], TOY_CLOSING[register], len(src)
        where = self.spec.framing_positions
        if where == "edge":
            phrases = ([opening] * (framing == "opening") + phrases
                       + [closing] * (framing == "closing"))
        elif where == "slots":
            phrases = ([opening if framing == "opening" else TOY_SLOT] + phrases
                       + [closing if framing == "closing" else TOY_SLOT])
        # inline: before concepts 0, 3, 6, ...
        elif framing == "opening":
            phrases = [p for i, w in enumerate(phrases)
                       for p in ([opening, w] if i % 3 == 0 else [w])]
        # after concepts n-1, n-4, ...
        elif framing == "closing":
            phrases = [p for i, w in enumerate(phrases)
                       for p in ([w, closing] if (n - 1 - i) % 3 == 0 else [w])]
        return " ".join(phrases).split()

    def valid_translations(self, src):
        """All valid translations of a source (list of words), as strings, in a fixed order."""
        return [" ".join(self.translate(src, r, f)) for r in self.REGISTERS for f in self.FRAMINGS]

    def mode(self, src, tgt):
        """Which of the six valid translations `tgt` (a list of words) is, as an index into
        valid_translations(src), or None for an invalid translation."""
        text = " ".join(tgt)
        valid = self.valid_translations(src)
        return valid.index(text) if text in valid else None

    def target_mode(self, src, drawn):
        """The (register, framing) of the target of `src` under the task's mode_rule; `drawn` is the
        uniformly drawn pair, drawn under every rule so that a seed gives the same sources in every
        task."""
        rule = self.spec.mode_rule
        if rule == "uniform":
            return drawn
        if rule == "source-hash":     # sha256, not hash(): the same in every process
            index = int.from_bytes(hashlib.sha256(" ".join(src).encode()).digest()[:8], "big") % 6
        else:                         # first-word
            index = self.word_class[src[0]]
        # the order of valid_translations
        return self.REGISTERS[index // 3], self.FRAMINGS[index % 3]

    def sample_pairs(self, n, rng):
        pairs = []
        for _ in range(n):
            src = self.sample_source(rng)
            drawn = rng.choice(self.REGISTERS), rng.choice(self.FRAMINGS)
            pairs.append((src, self.translate(src, *self.target_mode(src, drawn))))
        return pairs

    def add_noise(self, pairs, rng):
        """The pairs with each target made invalid with probability spec.noise, by one edit."""
        return [(src, self.corrupt(src, tgt, rng) if rng.random() < self.spec.noise else tgt)
                for src, tgt in pairs]

    def corrupt(self, src, tgt, rng):
        """A near miss of a target: a word dropped or two adjacent words swapped, redrawn until
        mode() says invalid (dropping a framing word, or swapping equal words, can leave it
        valid)."""
        while True:
            words, i = list(tgt), rng.randrange(len(tgt) - 1)
            if rng.random() < 0.5:
                del words[i + rng.randint(0, 1)]
            else:
                words[i], words[i + 1] = words[i + 1], words[i]
            if self.mode(src, words) is None:
                return words


@dataclass
class Corpus:
    """Token lists of every split, the vocabulary, and (for the toy task) the oracle of valid
    outputs. `bpe` is set where em-nat learned the subwords itself and applies them to new input."""
    train: list
    valid: list
    test: list
    vocab: Vocab
    name: str
    bpe: BPE = None
    toy: ToyTask = None
    is_bpe: bool = False           # targets hold "@@ " subwords, to be removed before BLEU
    # the line index in train.SRC of every training pair (corpus directories)
    train_lines: list = None
    train_file_lines: int = None   # the number of lines of train.SRC

    def ids(self, split):
        """Pairs of a split as (source ids, target ids)."""
        return [(self.vocab.encode(s), self.vocab.encode(t)) for s, t in getattr(self, split)]


def make_toy_corpus(seed=1, train_size=None, valid_size=300, test_size=300, task="toy"):
    """The corpus of the named embedded task (TASKS): train_size None takes the task's default.
    Noise touches training targets only (valid/test references stay valid), from its own generator,
    so the same seed gives the same sources in every task."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}: the embedded tasks are {', '.join(TASKS)}")
    spec = TASKS[task]
    toy, rng = ToyTask(spec), random.Random(seed)
    sizes = (spec.train_size if train_size is None else train_size, valid_size, test_size)
    train, valid, test = (toy.sample_pairs(n, rng) for n in sizes)
    train = toy.add_noise(train, random.Random(f"noise {seed}"))
    vocab = Vocab.build([s for s, _ in train] + [t for _, t in train])
    return Corpus(train, valid, test, vocab, name=f"{task} (seed {seed})", toy=toy)


def load_corpus_dir(data_dir, src_lang, tgt_lang, bpe_merges, max_len, bpe=None,
                    max_train_pairs=None, log=print):
    """A corpus directory in the fairseq layout: {train,valid,test}.{src,tgt}. Text that already
    holds "@@ " markers is used as it is; plain tokenised text gets a joint BPE learned on train (or
    the given `bpe`, when a run resumes). max_train_pairs keeps only the first pairs of train."""
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such directory (expected "
                        f"train/valid/test.{src_lang}/.{tgt_lang})")
    paths = {split: (os.path.join(data_dir, f"{split}.{src_lang}"),
                     os.path.join(data_dir, f"{split}.{tgt_lang}"))
             for split in ("train", "valid", "test")}
    for split in ("train", "valid"):
        for path in paths[split]:
            if not os.path.isfile(path):
                raise DataError(f"{path}: missing: a corpus directory needs train and valid splits "
                                f"named {split}.{src_lang} and {split}.{tgt_lang} (--src/--tgt set "
                                f"the suffixes)")
    splits = {}
    for split, (src_path, tgt_path) in paths.items():
        if split == "test" and not os.path.isfile(src_path):
            splits[split] = []
            continue
        # Length filtering waits until after BPE (below); evaluation splits keep every sentence.
        numbered, n_lines = read_numbered_parallel(src_path, tgt_path)
        pairs, empty = [(s, t) for _, s, t in numbered], n_lines - len(numbered)
        if split == "train":
            pairs = pairs[:max_train_pairs or None]
            # the pairs' lines in train.SRC
            line_index, train_file_lines = [i for i, _, _ in numbered], n_lines
        log(f"{split}: {len(pairs)} pairs from {src_path} ({empty} pairs with an empty side "
            f"dropped)")
        splits[split] = pairs
    is_bpe = any("@@" in tok for _, tgt in splits["train"][:1000] for tok in tgt)
    if not is_bpe and (bpe is not None or bpe_merges > 0):
        if bpe is None:
            log(f"learning a joint BPE with {bpe_merges} merges on the training text ...")
            bpe = BPE.learn([s for s, _ in splits["train"]] + [t for _, t in splits["train"]],
                            bpe_merges)
        splits = {k: [(bpe.encode(s), bpe.encode(t)) for s, t in v] for k, v in splits.items()}
        is_bpe = True
    before = len(splits["train"])
    kept = [j for j, (s, t) in enumerate(splits["train"]) if max(len(s), len(t)) <= max_len]
    splits["train"] = [splits["train"][j] for j in kept]
    log(f"train: dropped {before - len(splits['train'])} pairs longer than {max_len} tokens "
        f"(--max-len)")
    vocab = Vocab.build([s for s, _ in splits["train"]] + [t for _, t in splits["train"]])
    return Corpus(splits["train"], splits["valid"], splits["test"], vocab,
                  name=os.path.basename(os.path.normpath(data_dir)), bpe=bpe, is_bpe=is_bpe,
                  train_lines=[line_index[j] for j in kept], train_file_lines=train_file_lines)
