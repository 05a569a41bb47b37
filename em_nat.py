"""em_nat.py: the EM loop of Sun & Yang (2020), as one function (`em_loop`) over resumable stages.

    stage      trains                 on the targets
    ar         AR_0                   the real training data
    nar-raw    NAR (baseline)         the real training data: suffers from multi-modality
    nar-kd     NAR_0                  AR_0's beam outputs (sequence-level KD)
    em{i}-ar   AR_i  (E-step)         within Q_i (AR_{i-1}'s N-best under a quality constraint), the
                                      candidates NAR_{i-1} likes best
    em{i}-nar  NAR_i (M-step)         AR_i's beam outputs

README "Method" tells the idea. Every stage writes its directory (model.pt, config.json, vocab.txt, the
targets it trained on, result.json last), so a re-run with the same --out continues after the last
finished stage. On the embedded toy task, where the valid translations of every source are known, each
stage also reports exactly what its training targets are (which of the six valid translations, or none).
`python train.py --help` lists the options; train.py turns them into the RunConfig used here.
"""
import json
import math
import os
import random
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import torch

import decode
from data import BPE, DataError, Vocab, load_corpus_dir, make_toy_corpus, read_lines, write_text_atomic
from decode import bleu, ids_to_text, nbest_ids, translate_ids
from model import autocast_for, build_model, CheckpointError, load_checkpoint, model_config, synchronize
from train import TrainConfig, barrier, from_main, gather, is_main, remove_loop_files, shard, train_model, world_size

SHARED_IWSLT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "iwslt14.de-en")
SELECTIONS = ("nar", "random", "ar-top1")


# ------------------------------------------------------------------------------------------------
# Configuration (filled by train.py's command line)
# ------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    data_dir: str = None          # fairseq-layout corpus directory; None: the embedded toy task
    src: str = "de"
    tgt: str = "en"
    bpe_merges: int = 10000       # joint BPE merges learned on plain text (0: the text as it is)
    max_len: int = None           # longest sentence in tokens (None: the preset's)
    max_train_pairs: int = None
    toy_train_size: int = 6000
    distillation_targets: str = None  # a file of the first NAR model's targets, one line per line of
                                      # train.SRC (e.g. a stronger teacher's outputs); None: AR_0's beam


@dataclass
class EMConfig:
    iterations: int = 2           # EM iterations after distillation
    candidates: int = 20          # N of the AR N-best that Q is drawn from (the official code: 20)
    quality_margin: float = 1.0   # Q: candidates within this many nats (length-normalised AR score) of the
                                  # AR model's best; None: all N (the official code). README "The E-step,
                                  # measured" says why 1.0
    selection: str = "nar"        # E-step: "nar" (the paper), or the controls "random" and "ar-top1"
    kd_beam: int = 5              # beam of the AR outputs that train NAR models (M-step, KD)
    beam: int = 5                 # AR beam when evaluating
    alpha: float = 1.0            # length penalty exponent of beam search and NPD rescoring
    length_beam: int = 5          # NAR length candidates rescored by the AR model (NPD)
    init: str = "scratch"         # each iteration's models start from scratch or from the previous ones
    speed_sentences: int = 50     # test sentences timed at batch size 1 for the speed-up column
    examples: int = 2             # test sentences printed as text after each stage (and one E-step source)


@dataclass
class RunConfig:
    out: str
    preset: str
    seed: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    em: EMConfig = field(default_factory=EMConfig)


# ------------------------------------------------------------------------------------------------
# The EM steps
# ------------------------------------------------------------------------------------------------
def distil(run, ar_model):
    """Sequence-level knowledge distillation, the M-step's targets: the AR model's beam-search
    translation of every training source (each process translates its shard; all get the whole list)."""
    return gather(translate_ids(ar_model, shard(run.train_sources), method="beam", beam=run.em.kd_beam,
                                alpha=run.em.alpha, max_tokens=run.decode_tokens, device=run.device,
                                progress=is_main()))


def first_distillation_targets(run, ar_stage):
    """The first NAR model's targets (stage nar-kd): AR_0's beam outputs, or the precomputed targets
    the user brings (DataConfig.distillation_targets)."""
    if run.cfg.data.distillation_targets is None:
        return distil(run, ar_stage.model())
    return run.read_distillation_targets(run.cfg.data.distillation_targets)


def quality_constrained_set(candidates, ar_scores, margin):
    """The E-step's set Q for one source: its AR N-best candidates (good translations by construction,
    as in the official code) that are also within `margin` nats of the AR model's best length-normalised
    score (None: no margin). The paper's constraint asks for targets of high expected quality; the
    margin makes that explicit where the N-best list reaches far below the AR model's own choice."""
    if margin is None:
        return list(candidates)
    best = max(ar_scores)
    return [c for c, s in zip(candidates, ar_scores) if s >= best - margin]


@torch.no_grad()
def nar_scores(run, nar_model, pairs):
    """Sentence log-likelihoods log p_NAR(y|x) (Transformer.score) of (source, target) id pairs, a list
    in the order of `pairs`. Under torchrun every process scores its share and the scores are gathered,
    so every process must call it (rank 0 alone: local_nar_scores)."""
    return gather(local_nar_scores(run, nar_model, shard(pairs)))


@torch.no_grad()
def local_nar_scores(run, nar_model, pairs):
    """nar_scores in this process alone, batched by the token budget."""
    scores = [0.0] * len(pairs)
    with autocast_for(run.device):
        for batch in decode.make_batches([max(len(s), len(t)) for s, t in pairs], run.decode_tokens):
            src = decode.pad_batch([pairs[j][0] for j in batch], run.device)
            tgt = decode.pad_batch([pairs[j][1] for j in batch], run.device)
            for j, score in zip(batch, nar_model.score(src, tgt).tolist()):
                scores[j] = score
    return scores


@torch.no_grad()
def select_by_nar_likelihood(run, nar_model, sources, sets):
    """The E-step's selection (official score_nat.py + data_selection.py): score every (source,
    candidate) pair by the full NAR log-likelihood log p(T|x) + sum_t log p(y_t|x,T) (no token masked,
    NOT length-normalised, output layer in float32) and keep each source's best candidate (ties: the
    first). sets: one list of candidates per source. Returns (selected targets, their NAR scores)."""
    # >>> exercise 7: the E-step's selection
    flat = [(i, cand) for i, cands in enumerate(sets) for cand in cands
            if 0 < len(cand) <= nar_model.cfg.max_len]                # the NAR model cannot emit length 0
    scores = nar_scores(run, nar_model, [(sources[i], cand) for i, cand in flat])
    best = [(float("-inf"), None)] * len(sources)
    for (i, cand), score in zip(flat, scores):
        if score > best[i][0]:
            best[i] = (score, cand)
    selected = [cand if cand is not None else sets[i][0] for i, (_, cand) in enumerate(best)]
    return selected, [score for score, _ in best]
    # <<< exercise 7


def select(run, nar_model, sets, iteration):
    """The E-step's choice within Q: the NAR model's favourite (the paper), or a control: a random member
    of Q, or the AR model's own top-1 (one more round of distillation from a retrained AR model)."""
    if run.em.selection == "nar":
        return select_by_nar_likelihood(run, nar_model, run.train_sources, sets)[0]
    if run.em.selection == "random":
        rng = random.Random(run.cfg.seed * 7919 + iteration)
        return [rng.choice(cands) for cands in sets]
    return [cands[0] for cands in sets]                               # ar-top1: the N-best is sorted


def e_step(run, stage, ar_model, nar_model, iteration):
    """E-step i: Q = AR_{i-1}'s N-best under the quality constraint; the targets = NAR_{i-1}'s choice in
    Q. The N-best (with its AR scores) is saved in the stage directory and read back on resume.
    Returns (targets, notes on Q for the stage's result)."""
    candidates, ar_scores = run.saved_nbest(stage, lambda: [gather(part) for part in nbest_ids(
        ar_model, shard(run.train_sources), run.em.candidates, alpha=run.em.alpha, max_tokens=run.decode_tokens,
        device=run.device, progress=is_main())])
    sets = [quality_constrained_set(c, s, run.em.quality_margin) for c, s in zip(candidates, ar_scores)]
    targets = select(run, nar_model, sets, iteration)
    if run.em.examples:
        print(format_e_step_example(run, nar_model, 0, candidates[0], ar_scores[0], sets[0], targets[0]))
    return targets, candidate_set_notes(run, sets, targets)


# ------------------------------------------------------------------------------------------------
# Multi-modality of a stage's training targets
# ------------------------------------------------------------------------------------------------
def target_modes(run, targets, split="train"):
    """Embedded task only (its valid translations are known): which of the six valid translations each
    target for the sources of `split` is. Returns the share of each mode (%), the mode entropy in bits (uniform: 2.58;
    one mode everywhere: 0) and the share of invalid targets (%)."""
    toy, words = run.corpus.toy, run.corpus.vocab.decode
    modes = [toy.mode(src, words(t)) for (src, _), t in zip(getattr(run.corpus, split), targets)]
    counts = Counter(m for m in modes if m is not None)
    valid = sum(counts.values())
    shares = [counts[m] / max(valid, 1) for m in range(6)]
    entropy = -sum(p * math.log2(p) for p in shares if p > 0)
    return {"mode_shares": [100 * p for p in shares], "mode_entropy": entropy,
            "invalid": 100.0 * (len(modes) - valid) / max(len(modes), 1)}


def candidate_set_notes(run, sets, targets, split="train"):
    """What Q holds and what the E-step took from it: Q's mean size, the share of selections that are the
    AR model's own top-1 (the E-step moved nothing there) and, on the embedded task, the share of valid
    translations among Q's candidates and of sources with at least one valid candidate."""
    notes = {"q_size": sum(map(len, sets)) / max(len(sets), 1),
             "q_top1": 100.0 * sum(t == cands[0] for t, cands in zip(targets, sets)) / max(len(sets), 1)}
    if run.corpus.toy is not None:
        toy, words = run.corpus.toy, run.corpus.vocab.decode
        valid = [[toy.mode(src, words(c)) is not None for c in cands] for (src, _), cands in zip(getattr(run.corpus, split), sets)]
        notes["q_valid"] = 100.0 * sum(map(sum, valid)) / max(sum(map(len, valid)), 1)
        notes["q_sources_with_valid"] = 100.0 * sum(any(v) for v in valid) / max(len(valid), 1)
    return notes


@torch.no_grad()
def alignment_entropy(pairs, iterations=5, batch_size=2000):
    """Corpus-level multi-modality: fit IBM Model 1 word translation probabilities
    t(y|x) on the pairs (with a NULL source word), align every target token to its most likely
    source token, and return the conditional entropy H(Y|X) of the aligned (x, y) pairs in bits.
    A corpus whose sources are translated consistently one way scores low; one that mixes several
    valid translations of the same words scores high. (Zhou et al. use fast_align and average
    H(y|x) over source words; we weight by frequency, which is the H(Y|X) of the aligned pairs.)"""
    src_ids = sorted({w for s, _ in pairs for w in s})
    tgt_ids = sorted({w for _, t in pairs for w in t})
    src_index = {w: i + 1 for i, w in enumerate(src_ids)}              # 0 = NULL, the padding source
    tgt_index = {w: i for i, w in enumerate(tgt_ids)}
    n_src, n_tgt = len(src_ids) + 1, len(tgt_ids)
    encoded = [([0] + [src_index[w] for w in s], [tgt_index[w] for w in t]) for s, t in pairs]
    chunks = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        s_len, t_len = max(len(s) for s, _ in chunk), max(len(t) for _, t in chunk)
        src = torch.full((len(chunk), s_len), -1, dtype=torch.long)
        tgt = torch.full((len(chunk), t_len), -1, dtype=torch.long)
        for row, (s, t) in enumerate(chunk):
            src[row, :len(s)] = torch.tensor(s)
            tgt[row, :len(t)] = torch.tensor(t)
        chunks.append((src, tgt))
    prob = torch.full((n_src, n_tgt), 1.0 / n_tgt)                      # t(y|x), uniform start
    for _ in range(iterations):
        counts = torch.zeros(n_src, n_tgt)
        for src, tgt in chunks:
            posterior = align_posterior(prob, src, tgt)                   # (batch, t_len, s_len)
            s_idx = src.clamp(min=0)[:, None, :].expand_as(posterior)
            t_idx = tgt.clamp(min=0)[:, :, None].expand_as(posterior)
            counts.index_put_((s_idx.reshape(-1), t_idx.reshape(-1)), posterior.reshape(-1), accumulate=True)
        prob = counts / counts.sum(1, keepdim=True).clamp(min=1e-12)
    pair_counts = torch.zeros(n_src * n_tgt)
    for src, tgt in chunks:
        best = align_posterior(prob, src, tgt).argmax(-1)                # (batch, t_len) aligned position
        x = src.clamp(min=0).gather(1, best)
        real = tgt >= 0
        pair_counts.index_add_(0, (x * n_tgt + tgt.clamp(min=0))[real], torch.ones(int(real.sum())))
    joint = pair_counts.view(n_src, n_tgt) / pair_counts.sum()
    given_x = joint / joint.sum(1, keepdim=True).clamp(min=1e-12)
    return float(-(joint * torch.log2(given_x.clamp(min=1e-12))).sum())


def align_posterior(prob, src, tgt):
    """IBM Model 1: p(a_j = i | x, y) proportional to t(y_j | x_i). src (batch, s_len), tgt
    (batch, t_len), -1 padded -> (batch, t_len, s_len), zero at padding."""
    scores = prob[src.clamp(min=0)[:, None, :], tgt.clamp(min=0)[:, :, None]]  # (batch, t_len, s_len)
    scores = scores * (src >= 0)[:, None, :] * (tgt >= 0)[:, :, None]
    return scores / scores.sum(-1, keepdim=True).clamp(min=1e-12)


# ------------------------------------------------------------------------------------------------
# Evaluation of a stage's model on the test split (the validation split only chooses checkpoints)
# ------------------------------------------------------------------------------------------------
def repeat_rate(outputs):
    """Percentage of output tokens equal to the token before them: the NAR multi-modality symptom."""
    repeats = sum(a == b for out in outputs for a, b in zip(out, out[1:]))
    return 100.0 * repeats / max(sum(len(out) for out in outputs), 1)


def quality(run, outputs):
    """BLEU (and on the toy task the valid-translation rate) of id outputs on the evaluation split."""
    hyps = [ids_to_text(out, run.corpus.vocab, run.corpus.is_bpe) for out in outputs]
    pairs = getattr(run.corpus, run.eval_split)
    sources = [s for s, _ in pairs]
    if run.corpus.toy is not None:
        valid_sets = [run.corpus.toy.valid_translations(s) for s in sources]
        refs = [list(r) for r in zip(*valid_sets)]                        # 6 reference sets
        score, _ = bleu(hyps, refs)
        rate = 100.0 * sum(h in v for h, v in zip(hyps, valid_sets)) / len(hyps)
        return {"bleu": score, "valid_rate": rate}
    refs = [[decode.remove_bpe(" ".join(t)) if run.corpus.is_bpe else " ".join(t) for _, t in pairs]]
    tok_bleu, _ = bleu(hyps, refs, tokenized=True)
    detok, signature = bleu(hyps, refs, tokenized=False)
    return {"bleu": tok_bleu, "detok_bleu": detok, "signature": signature}


@torch.no_grad()
def targets_nll(run, nar_model, targets, limit=2000):
    """The EM objective's view of multi-modality: the NAR model's negative log-likelihood per token,
    -log p_NAR(y|x) / |y| (length term included), of (up to `limit` of) the targets it was trained on.
    Targets that mix several translations of the same sources cannot all be likely: lower is simpler."""
    pairs = [(s, t) for s, t in zip(run.train_sources, targets) if 0 < len(t) <= run.max_len][:limit]
    return -sum(local_nar_scores(run, nar_model, pairs)) / max(sum(len(t) for _, t in pairs), 1)


def time_per_sentence(fn, sources, device):
    """Milliseconds per sentence of fn(src) over sources decoded one at a time (batch size 1)."""
    fn(decode.pad_batch([sources[0]], device))                            # warm-up
    synchronize(device)
    start = time.perf_counter()
    for s in sources:
        fn(decode.pad_batch([s], device))
    synchronize(device)
    return (time.perf_counter() - start) * 1000 / len(sources)


def evaluate_ar(run, ar_model):
    """AR beam search BLEU. Returns (result, {"beam": outputs})."""
    outs = translate_ids(ar_model, run.eval_sources, method="beam", beam=run.em.beam, alpha=run.em.alpha,
                         max_tokens=run.decode_tokens, device=run.device)
    return {**quality(run, outs), "repeats": repeat_rate(outs)}, {"beam": outs}


def evaluate_nar(run, nar_model, ar_model):
    """NAR BLEU with plain argmax, with ODD, and with ODD + AR rescoring of a length beam (NPD); and the
    speed-up of NAR ODD over AR beam search at batch size 1, timed side by side.
    Returns (result, {"argmax": ..., "ODD": ..., "NPD": ...} outputs)."""
    common = dict(method="nar", max_tokens=run.decode_tokens, device=run.device)
    argmax = translate_ids(nar_model, run.eval_sources, odd=False, **common)
    odd = translate_ids(nar_model, run.eval_sources, odd=True, **common)
    rescored = translate_ids(nar_model, run.eval_sources, odd=True, length_beam=run.em.length_beam,
                             rescorer=ar_model, alpha=run.em.alpha, **common)
    timed = run.eval_sources[:run.em.speed_sentences]
    with torch.no_grad(), autocast_for(run.device):
        ar_ms = time_per_sentence(lambda s: decode.ar_beam_search(ar_model, s, beam=run.em.beam,
                                                                  alpha=run.em.alpha), timed, run.device)
        nar_ms = time_per_sentence(lambda s: decode.nar_decode(nar_model, s), timed, run.device)
    result = {**quality(run, odd), "repeats": repeat_rate(argmax), "ar_beam_ms": ar_ms, "nar_ms": nar_ms,
              "speedup": ar_ms / nar_ms}
    result["argmax"] = quality(run, argmax)
    result["rescored"] = quality(run, rescored)
    return result, {"argmax": argmax, "ODD": odd, "NPD": rescored}


# ------------------------------------------------------------------------------------------------
# Printed examples: what the numbers mean, as text
# ------------------------------------------------------------------------------------------------
def marked_text(run, ids):
    """An output as text with every token that repeats the one before it in [brackets]: the NAR model's
    multi-modality symptom, made visible."""
    shown = []
    for i, word in enumerate(run.corpus.vocab.decode(ids)):
        if i and ids[i] == ids[i - 1]:
            word = f"[{word[:-2]}]@@" if word.endswith("@@") else f"[{word}]"     # BPE pieces still join
        shown.append(word)
    text = " ".join(shown)
    return decode.remove_bpe(text) if run.corpus.is_bpe else text


def validity(run, src_words, text):
    """On the embedded task: whether `text` is one of the source's six valid translations."""
    if run.corpus.toy is None:
        return ""
    return "   (valid)" if text in run.corpus.toy.valid_translations(src_words) else "   (invalid)"


def format_examples(run, outputs, count):
    """The first `count` sentences of the evaluation split: source, valid translations (embedded task)
    or reference, and each decoder's output."""
    pairs, lines = getattr(run.corpus, run.eval_split), []
    for i in range(min(count, len(pairs))):
        src, ref = pairs[i]
        unbpe = (lambda w: decode.remove_bpe(" ".join(w))) if run.corpus.is_bpe else " ".join
        lines.append(f"  source     {unbpe(src)}")
        if run.corpus.toy is not None:
            lines += [f"  {'valid' if j == 0 else '':<10} {t}" for j, t in enumerate(run.corpus.toy.valid_translations(src))]
        else:
            lines.append(f"  reference  {unbpe(ref)}")
        for method, outs in outputs.items():
            text = ids_to_text(outs[i], run.corpus.vocab, run.corpus.is_bpe)
            shown = marked_text(run, outs[i]) if method == "argmax" else text
            lines.append(f"  {method:<10} {shown}{validity(run, src, text)}")
        lines.append("")
    note = "  ([x] = a token repeating the one before it)\n" if "argmax" in outputs else ""
    return f"examples ({run.eval_split} split):\n" + "\n".join(lines) + note


def format_e_step_example(run, nar_model, index, candidates, ar_scores, q, selected):
    """One training source's E-step: its AR N-best with AR scores (length-normalised), which are in Q,
    the NAR model's score log p(y|x) of those in Q, validity (embedded task), and the selected one."""
    src_words = run.corpus.train[index][0]
    in_q = [c for c in q if 0 < len(c) <= run.max_len]
    nar = dict(zip(map(tuple, in_q), nar_scores(run, nar_model, [(run.train_sources[index], c) for c in in_q])))
    lines = [f"E-step example: training source {index}: {' '.join(src_words)}",
             f"  {'AR score':>8} {'in Q':>4} {'NAR score':>9}  candidate"]
    for cand, score in zip(candidates, ar_scores):
        text = ids_to_text(cand, run.corpus.vocab, run.corpus.is_bpe)
        nar_cell = f"{nar[tuple(cand)]:9.2f}" if tuple(cand) in nar else f"{'':>9}"
        mark = "  <- selected" if cand == selected else ""
        lines.append(f"  {score:8.3f} {'yes' if cand in q else '':>4} {nar_cell}  {text}{validity(run, src_words, text)}{mark}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def em_loop(run):
    """The paper's algorithm. Each `run.stage` trains one model on the targets its function computes
    (or reads a finished stage back from its directory) and evaluates it; it returns a handle whose
    .model() loads the model when a later step needs it."""
    # >>> exercise 8: the EM loop
    real = [t for _, t in run.train_ids]
    ar = run.stage("ar", "ar", "real data", lambda: real)                             # AR_0
    run.stage("nar-raw", "nar", "real data", lambda: real, rescorer=ar)                # the NAR baseline
    kd = "AR beam outputs (KD)" if run.cfg.data.distillation_targets is None else "precomputed KD targets"
    nar = run.stage("nar-kd", "nar", kd, lambda: first_distillation_targets(run, ar), rescorer=ar)   # NAR_0
    for i in range(1, run.em.iterations + 1):
        prev_ar, prev_nar = ar, nar
        # E-step: within Q (AR_{i-1}'s N-best), the targets NAR_{i-1} likes best; AR_i learns them.
        ar = run.stage(f"em{i}-ar", "ar", f"{prev_ar.name} N-best, {run.em.selection} selection",
                       lambda: e_step(run, f"em{i}-ar", prev_ar.model(), prev_nar.model(), i), init_from=prev_ar)
        # M-step: NAR_i learns AR_i's outputs.
        nar = run.stage(f"em{i}-nar", "nar", f"{ar.name} beam outputs", lambda: distil(run, ar.model()),
                        init_from=prev_nar, rescorer=ar)
    return run.results
    # <<< exercise 8


class Stage:
    """A stage's model, loaded from its directory on first use."""

    def __init__(self, run, name, model=None):
        self.run, self.name, self._model = run, name, model

    def model(self):
        if self._model is None:
            self._model = load_checkpoint(self.run.stage_dir(self.name), self.run.device)[0]
        return self._model


def config_settings(data: DataConfig, train: TrainConfig, em: EMConfig, world):
    """The options that shape a run's models and targets, as run.json records them. An update's size
    is recorded as batches_per_update (update_freq x processes): 8 processes with update_freq 1 train
    exactly as 1 process with update_freq 8, and may resume each other's runs."""
    data = asdict(data)
    if data["data_dir"] is None:
        data["bpe_merges"] = None
    train_settings = {k: v for k, v in asdict(train).items() if k not in ("device", "update_freq")}
    train_settings["batches_per_update"] = train.update_freq * world
    return {"data_options": data, "train": train_settings,
            "em": {k: v for k, v in asdict(em).items() if k not in ("iterations", "speed_sentences", "examples")}}


def unrecorded_settings():
    """What a run did about a setting that its run.json does not record (written before em-nat had
    it): today's default, except the stage's model, which was the best validation loss until the last
    step became the default."""
    defaults = config_settings(DataConfig(), TrainConfig(), EMConfig(), world=1)
    defaults["train"]["final_model"] = "best"
    return defaults


def setting_changes(saved, current, defaults):
    """'name: saved -> current' for every setting of `current` that differs from `saved` (sections,
    e.g. "train", compared key by key). A key missing from `saved` counts as its value in `defaults`
    (unrecorded_settings)."""
    changes = []
    for key, value in current.items():
        if isinstance(value, dict) and isinstance(saved.get(key), dict):
            changes += [f"{key}.{change}" for change in setting_changes(saved[key], value, defaults.get(key, {}))]
        elif key not in saved and key in defaults:
            if defaults[key] != value:
                changes.append(f"{key}: {defaults[key]} (not recorded) -> {value}")
        elif saved.get(key) != value:
            changes.append(f"{key}: {saved.get(key)} -> {value}")
    return changes


class Run:
    """A run directory, its data, and the stages trained into it."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.em = cfg, cfg.em
        if self.em.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {', '.join(SELECTIONS)}, not {self.em.selection!r}")
        self.device = cfg.train.device
        self.dir = cfg.out
        os.makedirs(self.dir, exist_ok=True)
        self.max_len = cfg.data.max_len or model_config(cfg.preset, 0, "ar").max_len
        self.decode_tokens = cfg.train.max_tokens * 4
        if not is_main():
            barrier()                     # under torchrun rank 0 first learns the BPE and writes run.json;
        self.corpus = self.load_corpus()  # the other processes then read them
        self.check_run_dir()
        if is_main():
            barrier()
        self.train_ids = self.corpus.ids("train")
        self.train_sources = [s for s, _ in self.train_ids]
        # The validation split chooses checkpoints (its loss needs pairs the model can hold); every stage
        # is evaluated on the test split, as the paper reports, or on validation where no test split exists.
        valid_ids = self.corpus.ids("valid")
        self.valid_loss_pairs = [(s, t) for s, t in valid_ids if max(len(s), len(t)) <= self.max_len]
        if not self.valid_loss_pairs:
            raise DataError(f"{self.corpus.name}: none of the {len(valid_ids)} validation pairs is within "
                            f"--max-len {self.max_len} tokens, so no checkpoint could be chosen; raise --max-len")
        if cfg.data.distillation_targets is not None:
            self.read_distillation_targets(cfg.data.distillation_targets)   # refused now, not after AR_0
        self.eval_split = "test" if self.corpus.test else "valid"
        self.eval_sources = [s[:self.max_len] for s, _ in self.corpus.ids(self.eval_split)]
        self.results = []

    def load_corpus(self):
        data = self.cfg.data
        if data.data_dir is None:
            return make_toy_corpus(seed=self.cfg.seed, train_size=data.toy_train_size)
        bpe_path = os.path.join(self.dir, "bpe.codes")
        corpus = load_corpus_dir(data.data_dir, data.src, data.tgt, data.bpe_merges, self.max_len,
                                 bpe=BPE.load(bpe_path) if os.path.isfile(bpe_path) else None,
                                 max_train_pairs=data.max_train_pairs)
        if corpus.bpe is not None and not os.path.isfile(bpe_path) and is_main():
            corpus.bpe.save(bpe_path)
        return corpus

    def settings(self):
        """Everything that shapes the run's models and saved targets (run.json)."""
        return {"data": self.corpus.name, "preset": self.cfg.preset, "seed": self.cfg.seed,
                "vocab_size": len(self.corpus.vocab), "train_pairs": len(self.corpus.train),
                "max_len": self.max_len, **config_settings(self.cfg.data, self.cfg.train, self.em, world_size())}

    def check_run_dir(self):
        """A run directory belongs to one data set and one set of settings: resuming it with others
        would mix models trained on different vocabularies or targets. A setting that the saved
        run.json lacks (added to em-nat after the run began) counts as its default, the behaviour the
        run had: older run directories stay resumable."""
        settings, path = self.settings(), os.path.join(self.dir, "run.json")
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            defaults = unrecorded_settings()
            changed = setting_changes(saved, settings, defaults)
            if changed:
                raise CheckpointError(f"{path}: this run directory was made with other settings "
                                      f"({'; '.join(changed)}); use another --out or the original options")
        elif is_main():
            write_text_atomic(path, json.dumps(settings, indent=2))
        vocab_path = os.path.join(self.dir, "vocab.txt")
        if os.path.isfile(vocab_path) and Vocab.load(vocab_path).itos != self.corpus.vocab.itos:
            raise CheckpointError(f"{vocab_path}: differs from the vocabulary of the data; "
                                  f"use another --out for this data")
        if is_main():
            self.corpus.vocab.save(vocab_path)

    def stage_dir(self, name):
        return os.path.join(self.dir, name)

    # ----- one stage ------------------------------------------------------------------------------
    def stage(self, name, kind, trained_on, make_targets, init_from=None, rescorer=None):
        """Train a `kind` model on the targets make_targets() returns (a list, or (list, notes)),
        evaluate it and write result.json; or, if that file exists, read the finished stage back.
        Under torchrun every process trains, and decodes its share of the targets; rank 0 alone
        evaluates and writes."""
        path = os.path.join(self.stage_dir(name), "result.json")
        barrier()                                                         # rank 0 has written the last stage
        if os.path.isfile(path):
            with open(path) as f:
                self.results.append(json.load(f))
            print(f"[{name}] finished earlier: {path}")
            return Stage(self, name)
        print(f"[{name}] training {'an AR' if kind == 'ar' else 'a NAR'} model on {trained_on} ...")
        targets, notes = self.targets(name, make_targets)
        model, summary = self.train(name, self.new_model(kind, init_from), targets)
        result = None
        if is_main():
            result, outputs = self.evaluate(model, kind, targets, rescorer)
            result.update(stage=name, kind=kind, trained_on=trained_on, training=summary, **notes)
            write_text_atomic(path, json.dumps(result, indent=2))
            remove_loop_files(self.stage_dir(name))                       # the stage is done
            print(format_table([result], self.corpus.toy is not None))
            if self.em.examples:
                print(format_examples(self, outputs, self.em.examples))
        self.results.append(from_main(result))
        return Stage(self, name, model)

    def evaluate(self, model, kind, targets, rescorer):
        """A stage's results (its model on the test split, and the multi-modality of its targets), and
        its outputs."""
        result, outputs = evaluate_ar(self, model) if kind == "ar" else evaluate_nar(self, model, rescorer.model())
        result.update(split=self.eval_split, targets_entropy=alignment_entropy(list(zip(self.train_sources, targets))),
                      targets_nll=targets_nll(self, model, targets) if kind == "nar" else None)
        if self.corpus.toy is not None:
            result.update(target_modes(self, targets))
        return result, outputs

    def new_model(self, kind, init_from=None):
        """A fresh model. The seed is set right here, from the stage's place in the loop, because
        building a model draws from the RNG: a resumed stage must start from the same weights and
        dropout stream as an uninterrupted one."""
        torch.manual_seed(self.cfg.seed * 1000 + len(self.results))
        dropout = {} if self.cfg.train.dropout is None else {"dropout": self.cfg.train.dropout}
        model = build_model(model_config(self.cfg.preset, len(self.corpus.vocab), kind, max_len=self.max_len, **dropout),
                            self.device)
        if init_from is not None and self.em.init == "warm":
            model.load_state_dict(init_from.model().state_dict())
        return model

    def train(self, name, model, targets):
        """Train `model` on (training source, target) pairs into the stage's directory."""
        stage = self.stage_dir(name)
        for file in ("vocab.txt", "bpe.codes"):
            if os.path.isfile(os.path.join(self.dir, file)) and is_main():
                shutil.copyfile(os.path.join(self.dir, file), os.path.join(stage, file))
        pairs = [(s, t) for s, t in zip(self.train_sources, targets) if 0 < len(t) <= self.max_len]
        if len(pairs) < len(targets):
            print(f"{name}: {len(targets) - len(pairs)} of {len(targets)} targets are empty or longer than "
                  f"{self.max_len} tokens and are left out")
        return train_model(model, pairs, self.valid_loss_pairs, self.cfg.train, stage, desc=name,
                           meta={"stage": name, "is_bpe": self.corpus.is_bpe, "alpha": self.em.alpha})

    # ----- targets saved in the stage directory ----------------------------------------------------
    def targets(self, name, make_targets):
        """The stage's training targets (and notes on how they were chosen): computed once, saved as
        train.tgt (+ targets.json), and read back when a stage is resumed."""
        os.makedirs(self.stage_dir(name), exist_ok=True)
        path, notes_path = os.path.join(self.stage_dir(name), "train.tgt"), os.path.join(self.stage_dir(name),
                                                                                         "targets.json")
        saved = os.path.isfile(path) and os.path.isfile(notes_path)
        barrier()                                         # every process has looked before rank 0 writes
        if saved:
            with open(notes_path) as f:
                return self.read_ids(path), json.load(f)
        made = make_targets()
        targets, notes = made if isinstance(made, tuple) else (made, {})
        if is_main():
            self.write_ids(path, targets)
            write_text_atomic(notes_path, json.dumps(notes))
        return targets, notes

    def saved_nbest(self, name, compute):
        """The E-step's N-best candidates and their AR scores, saved as candidates.tgt / .scores."""
        path = os.path.join(self.stage_dir(name), "candidates")
        saved = os.path.isfile(path + ".tgt") and os.path.isfile(path + ".scores")
        barrier()                                         # every process has looked before rank 0 writes
        if saved:
            flat = self.read_ids(path + ".tgt")
            with open(path + ".scores") as f:
                flat_scores = [float(x) for x in f.read().split()]
        else:
            candidates, scores = compute()
            flat = [c for cands in candidates for c in cands]
            flat_scores = [s for row in scores for s in row]
            if is_main():
                self.write_ids(path + ".tgt", flat)
                write_text_atomic(path + ".scores", "".join(f"{s:.6f}\n" for s in flat_scores))
        n = self.em.candidates
        group = lambda items: [items[i * n:(i + 1) * n] for i in range(len(self.train_sources))]
        return group(flat), group(flat_scores)

    def read_distillation_targets(self, path):
        """Precomputed targets for the first NAR model: one line per line of train.SRC (the lines em-nat
        drops, empty or too long, are dropped from both), tokenised as train.TGT: BPE-encoded with the
        run's BPE where em-nat learned one and the file holds plain text."""
        corpus = self.corpus
        if corpus.train_lines is None:
            raise DataError(f"{path}: precomputed distillation targets need a corpus directory (--data-dir)")
        lines = read_lines(path)
        if len(lines) != corpus.train_file_lines:
            raise DataError(f"{path} has {len(lines)} lines but the training sources have {corpus.train_file_lines}: "
                            f"the distillation targets must translate train.{self.cfg.data.src} line by line")
        targets = [lines[i].split() for i in corpus.train_lines]
        if corpus.bpe is not None and not any("@@" in tok for t in targets[:1000] for tok in t):
            targets = [corpus.bpe.encode(t) for t in targets]
        return [corpus.vocab.encode(t) for t in targets]

    def write_ids(self, path, targets):
        write_text_atomic(path, "".join(" ".join(self.corpus.vocab.decode(t)) + "\n" for t in targets))

    def read_ids(self, path):
        with open(path, encoding="utf-8") as f:
            return [self.corpus.vocab.encode(line.split()) for line in f.read().split("\n")[:-1]]


# ------------------------------------------------------------------------------------------------
# Tables, and the command line's entry
# ------------------------------------------------------------------------------------------------
def cell(value, width, digits=2, suffix=""):
    """A right-aligned table cell; blank where a column does not apply (None)."""
    return f"{'':>{width}}" if value is None else f"{value:>{width - len(suffix)}.{digits}f}{suffix}"


def format_table(results, toy):
    """One row per stage: multi-modality of the training targets, quality, decoding speed-up."""
    header = (f"{'stage':<8} {'trained on':<34} {'H(y|x)':>7} {'NLL':>6} {'BLEU':>6} {'argmax':>7} {'+resc':>6} "
              + (f"{'valid%':>7} " if toy else f"{'detok':>6} ") + f"{'rep%':>5} {'speed-up':>8}")
    lines = [header, "-" * len(header)]
    for r in results:
        nar = r["kind"] == "nar"
        row = [f"{r['stage']:<8}", f"{r['trained_on'][:34]:<34}", cell(r["targets_entropy"], 7, 3),
               cell(r["targets_nll"], 6, 3), cell(r["bleu"], 6), cell(r["argmax"]["bleu"] if nar else None, 7),
               cell(r["rescored"]["bleu"] if nar else None, 6),
               cell(r["valid_rate"], 7, 1) if toy else cell(r["detok_bleu"], 6), cell(r["repeats"], 5, 1),
               cell(r["speedup"] if nar else None, 8, 1, "x")]
        lines.append(" ".join(row))
    return "\n".join(lines)


def format_modes_table(results):
    """Embedded task: what each stage's training targets are, and what the E-step's Q held."""
    header = (f"{'stage':<8} {'mode shares % (6 valid translations)':<38} {'H(mode)':>7} {'invalid%':>8} "
              f"{'|Q|':>5} {'Q valid%':>8} {'srcs w/ valid%':>14} {'=top1%':>6}")
    lines = [header, "-" * len(header)]
    for r in results:
        shares = " ".join(f"{p:5.1f}" for p in r["mode_shares"])
        lines.append(f"{r['stage']:<8} {shares:<38} {r['mode_entropy']:>7.3f} {r['invalid']:>8.1f} "
                     f"{cell(r.get('q_size'), 5, 1)} {cell(r.get('q_valid'), 8, 1)} "
                     f"{cell(r.get('q_sources_with_valid'), 14, 1)} {cell(r.get('q_top1'), 6, 1)}")
    return "\n".join(lines)


TABLE_NOTES = """columns: H(y|x) = lexical multi-modality of the stage's training targets (IBM-1 alignment entropy,
bits); NLL = the NAR model's -log p(y|x) per token of its own training targets (the EM objective);
BLEU = AR beam search / NAR ODD decoding on the {split} split{bleu_kind}; argmax = NAR plain argmax;
+resc = NAR ODD over a length window rescored by the AR model (NPD);{valid} rep% = repeated adjacent
tokens (AR beam / NAR argmax outputs); speed-up = NAR ODD vs AR beam search, batch size 1, timed side by side."""

MODES_NOTES = """mode shares = which of the six valid translations the training targets are (formal/casual x
none/opening/closing framing); H(mode) = their entropy in bits (2.58 = uniform, 0 = one mode);
invalid% = targets that are no valid translation; |Q| = mean candidates per source in the E-step's
set Q; Q valid% = valid translations among them; srcs w/ valid% = sources whose Q holds one;
=top1% = selected targets that are the AR model's own top-1 (where the E-step changed nothing)."""


def print_results(run, results):
    toy = run.corpus.toy is not None
    table = format_table(results, toy)
    print(f"\nevaluated on the {run.eval_split} split ({len(run.eval_sources)} sentences)\n" + table)
    print(TABLE_NOTES.format(
        split=run.eval_split,
        bleu_kind=" (multi-reference: all 6 valid translations)" if toy else " (tokenised, BPE removed)",
        valid=" valid% = exact valid translations;" if toy else
        " detok = sacreBLEU on em-nat's detokenised output against the detokenised references (not raw\n"
        "references: comparable within this table, not with published sacreBLEU scores);"))
    if toy:
        modes = format_modes_table(results)
        print("\n" + modes + "\n" + MODES_NOTES)
        table += "\n\n" + modes
    else:
        print(f"detok signature: {results[0]['signature']}")
        for r in results:
            if "q_size" in r:
                print(f"{r['stage']}: E-step Q held {r['q_size']:.1f} candidates per source; "
                      f"{r['q_top1']:.1f}% of the selections are the AR model's own top-1")
    write_text_atomic(os.path.join(run.dir, "results.json"), json.dumps(results, indent=2))
    write_text_atomic(os.path.join(run.dir, "results.txt"), table + "\n")
    print(f"saved {os.path.join(run.dir, 'results.json')}")


def main(cfg: RunConfig):
    """Run (or resume) the whole pipeline of one configuration and print its tables. Raises
    DataError / CheckpointError / TrainingError with a one-line message; train.py reports them."""
    run = Run(cfg)
    print(f"em-nat: {run.corpus.name}, {len(run.train_ids)} training pairs, vocabulary {len(run.corpus.vocab)}, "
          f"preset {cfg.preset}, device {run.device}, {world_size()} process(es), run directory {run.dir}")
    results = em_loop(run)
    if is_main():
        print_results(run, results)
    return results


MARGINS = (None, 3.0, 2.0, 1.0, 0.5, 0.0)      # 0: Q = the AR top-1 alone, i.e. plain distillation


def margin_study(cfg: RunConfig, margins=MARGINS):
    """How the quality margin shapes the first E-step, measured on a finished run (AR_0 in ar/, its saved
    N-best of the training sources in em1-ar/, NAR_0 in nar-kd/), training nothing: for each margin,
    Q's mean size, the share of selections that are the AR top-1, and the selected targets' quality: on
    the embedded task exactly (invalid share, mode entropy, Q valid%), on real data their sentence BLEU
    against the real reference. The same for held-out sources (the evaluation split), which NAR_0 never
    trained on: where NAR_0 re-picks the AR top-1 far more often on its own training sources, it
    remembers its training targets rather than judging the candidates. Prints a table; returns its rows."""
    run = Run(cfg)
    if not os.path.isfile(os.path.join(run.stage_dir("em1-ar"), "candidates.scores")):
        raise CheckpointError(f"{run.stage_dir('em1-ar')}: no saved N-best; run the pipeline into {cfg.out} first")
    nar_model, rows = Stage(run, "nar-kd").model(), []
    for split in ("train", run.eval_split):
        if split == "train":
            sources, (candidates, ar_scores) = run.train_sources, run.saved_nbest("em1-ar", compute=None)
        else:
            sources = run.eval_sources
            candidates, ar_scores = nbest_ids(Stage(run, "ar").model(), sources, run.em.candidates, alpha=run.em.alpha,
                                              max_tokens=run.decode_tokens, device=run.device, progress=True)
        nar = candidate_nar_scores(run, nar_model, sources, candidates)
        refs = [ids_to_text(t, run.corpus.vocab, run.corpus.is_bpe) for _, t in run.corpus.ids(split)]
        for margin in margins:
            keep = [quality_constrained_set(range(len(s)), s, margin) for s in ar_scores]   # Q, as indices
            chosen = [max(js, key=lambda j: nar[i][j]) for i, js in enumerate(keep)]   # ties: the first
            targets = [candidates[i][j] for i, j in enumerate(chosen)]
            sets = [[candidates[i][j] for j in js] for i, js in enumerate(keep)]
            row = {"sources": split, "margin": margin, **candidate_set_notes(run, sets, targets, split)}
            if run.corpus.toy is not None:
                row.update(target_modes(run, targets, split))
            else:
                hyps = [ids_to_text(t, run.corpus.vocab, run.corpus.is_bpe) for t in targets]
                row["sentence_bleu"] = sum(map(decode.sentence_bleu, hyps, refs)) / max(len(refs), 1)
            rows.append(row)
    print(format_margin_table(rows, toy=run.corpus.toy is not None))
    return rows


def candidate_nar_scores(run, nar_model, sources, candidates):
    """log p_NAR(y|x) of every candidate, as one list per source (-inf where it cannot be scored)."""
    scorable = [(i, j) for i, cands in enumerate(candidates) for j, c in enumerate(cands) if 0 < len(c) <= run.max_len]
    flat = nar_scores(run, nar_model, [(sources[i], candidates[i][j]) for i, j in scorable])
    scores = [[float("-inf")] * len(cands) for cands in candidates]
    for (i, j), score in zip(scorable, flat):
        scores[i][j] = score
    return scores


def format_margin_table(rows, toy):
    columns = ([("|Q|", "q_size", 1), ("Q valid%", "q_valid", 1), ("sel. invalid%", "invalid", 1),
                ("H(mode)", "mode_entropy", 3), ("=top1%", "q_top1", 1)] if toy else
               [("|Q|", "q_size", 1), ("=top1%", "q_top1", 1), ("sent-BLEU vs ref", "sentence_bleu", 2)])
    header = f"{'sources':<8} {'margin':>6} " + " ".join(f"{name:>{max(len(name), 6)}}" for name, _, _ in columns)
    lines = ["the first E-step (Q from AR_0's N-best, selected by NAR_0) for each quality margin, on the "
             "training sources and on held-out ones (margin 0: the AR top-1 alone, i.e. distillation)", header,
             "-" * len(header)]
    for r in rows:
        lines.append(f"{r['sources']:<8} {str(r['margin'] if r['margin'] is not None else 'none'):>6} " +
                     " ".join(f"{r[key]:>{max(len(name), 6)}.{d}f}" for name, key, d in columns))
    return "\n".join(lines)


def copy_shared_stages(source_dir, target_dir, stages=("ar", "nar-raw", "nar-kd")):
    """A control run differs from the paper's run only in its EM stages: start it with copies of the
    finished stages before them."""
    for name in stages:
        src, dst = os.path.join(source_dir, name), os.path.join(target_dir, name)
        if os.path.isfile(os.path.join(src, "result.json")) and not os.path.exists(dst) and is_main():
            shutil.copytree(src, dst)


def main_seeds(cfg: RunConfig, seeds, selections):
    """The pipeline once per seed (and per E-step selection: the paper's and the controls), each in
    <out>/seed<N>[-<selection>]; then one table of every stage's mean, min and max over the seeds."""
    by_stage = {}
    for seed in seeds:
        base = os.path.join(cfg.out, f"seed{seed}")
        for selection in selections:
            out = base if selection == "nar" else f"{base}-{selection}"
            os.makedirs(out, exist_ok=True)
            copy_shared_stages(base, out)
            run_cfg = replace(cfg, out=out, seed=seed, train=replace(cfg.train, seed=seed),
                              em=replace(cfg.em, selection=selection))
            for result in main(run_cfg):
                by_stage.setdefault((selection, result["stage"]), []).append(result)
    summary = format_seed_summary(by_stage, toy=cfg.data.data_dir is None, seeds=seeds)
    print("\n" + summary)
    if not is_main():
        return by_stage
    write_text_atomic(os.path.join(cfg.out, "seeds.txt"), summary + "\n")
    write_text_atomic(os.path.join(cfg.out, "seeds.json"), json.dumps(
        {f"{sel}/{stage}": results for (sel, stage), results in by_stage.items()}, indent=2))
    print(f"saved {os.path.join(cfg.out, 'seeds.txt')}")
    return by_stage


def spread(values, digits=2):
    """'mean [min, max]' of a list of numbers (blank when there are none)."""
    if not values:
        return ""
    return f"{sum(values) / len(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def nar_only(get):
    """A column that applies to NAR stages only."""
    return lambda r: get(r) if r["kind"] == "nar" else None


SEED_COLUMNS_TOY = (
    ("quality of the stage's model", [
        ("BLEU", lambda r: r["bleu"], 2), ("valid% (ODD)", lambda r: r["valid_rate"], 1),
        ("valid% argmax", nar_only(lambda r: r["argmax"]["valid_rate"]), 1),
        ("valid% NPD", nar_only(lambda r: r["rescored"]["valid_rate"]), 1)]),
    ("its training targets, and the E-step", [
        ("H(mode)", lambda r: r["mode_entropy"], 3), ("invalid%", lambda r: r["invalid"], 1),
        ("|Q|", lambda r: r.get("q_size"), 1), ("=top1%", lambda r: r.get("q_top1"), 1)]))
SEED_COLUMNS_REAL = (
    ("quality of the stage's model", [
        ("BLEU", lambda r: r["bleu"], 2), ("argmax", nar_only(lambda r: r["argmax"]["bleu"]), 2),
        ("+resc", nar_only(lambda r: r["rescored"]["bleu"]), 2), ("NLL", lambda r: r["targets_nll"], 3)]),)


def format_seed_summary(by_stage, toy, seeds):
    """Mean [min, max] over the seeds of each stage's headline figures, stages in run order: one table
    for the models' quality and (embedded task) one for their training targets and the E-step's Q."""
    lines = [f"over seeds {', '.join(map(str, seeds))}: mean [min, max] (test split)"]
    for title, columns in (SEED_COLUMNS_TOY if toy else SEED_COLUMNS_REAL):
        header = f"{'selection':<9} {'stage':<8} " + " ".join(f"{name:>21}" for name, _, _ in columns)
        lines += ["", title, header, "-" * len(header)]
        for (selection, stage), results in by_stage.items():
            cells = [spread([v for v in map(get, results) if v is not None], digits) for _, get, digits in columns]
            lines.append((f"{selection:<9} {stage:<8} " + " ".join(f"{c:>21}" for c in cells)).rstrip())
    return "\n".join(lines)
