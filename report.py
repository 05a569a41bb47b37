"""report.py: how em-nat measures a stage and shows it. None of this is the paper's algorithm (that
is em_nat.py); it is what lets you see whether the algorithm did what the paper says.

- Multi-modality of a set of training targets: the IBM-1 alignment entropy H(y|x) (any corpus), and
  on the embedded task, where every source's valid translations are known, exactly which of the six
  translations ("modes") each target is.
- Evaluation of a stage's model on the test split: BLEU, the valid-translation rate (embedded task),
  repeated tokens, the NAR model's likelihood of its own targets, and the NAR speed-up at batch
  size 1.
- Printed examples, every table of a run, the summary over seeds, and the training benchmark.

Every function takes models, pairs and settings; none needs em_nat's run object.
"""
import math
import os
import random
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

import decode
from data import Corpus, collate, make_batches, pad_batch, remove_bpe
from decode import NBest, bleu, decoders, ids_to_text, score_pairs, translate_ids
from model import (EOS, PAD, build_model, count_parameters, model_config, precision_context,
                   progress_bar, synchronize, write_atomic)
from train import TrainConfig, compiled, forward_backward, make_optimizer, optimizer_step


@dataclass
class TestSet:
    """The split every stage is measured on (test; valid where a corpus has none: the validation
    split's only other use is the checkpoint's loss), and how to decode it."""
    corpus: Corpus
    split: str
    max_len: int                  # sources are cut to the model's limit
    max_tokens: int               # token budget of a decoding batch
    device: str
    precision: str = "fp32"

    def __post_init__(self):
        self.pairs = getattr(self.corpus, self.split)                       # words
        self.sources = [s[:self.max_len] for s, _ in self.corpus.ids(self.split)]

    def text(self, ids):
        return ids_to_text(ids, self.corpus.vocab, self.corpus.is_bpe)


# ------------------------------------------------------------------------------------------------
# Multi-modality of a stage's training targets
# ------------------------------------------------------------------------------------------------
def target_modes(corpus, targets, split="train"):
    """Embedded task only (its valid translations are known): which of the six valid translations
    each target for the sources of `split` is. Returns the share of each mode (%), the mode entropy
    in bits (uniform: 2.58; one mode everywhere: 0) and the share of invalid targets (%)."""
    toy, words = corpus.toy, corpus.vocab.decode
    modes = [toy.mode(src, words(t)) for (src, _), t in zip(getattr(corpus, split), targets)]
    counts = Counter(m for m in modes if m is not None)
    valid = sum(counts.values())
    shares = [counts[m] / max(valid, 1) for m in range(6)]
    entropy = -sum(p * math.log2(p) for p in shares if p > 0)
    return {"mode_shares": [100 * p for p in shares], "mode_entropy": entropy,
            "invalid": 100.0 * (len(modes) - valid) / max(len(modes), 1)}


def candidate_set_notes(corpus, sets, targets, split="train"):
    """What Q holds and what the E-step took from it: Q's mean size, the share of selections that
    are the AR model's own top-1 (the E-step moved nothing there) and, on the embedded task, the
    share of valid translations among Q's candidates and of sources with at least one valid
    candidate."""
    notes = {"q_size": sum(map(len, sets)) / max(len(sets), 1),
             "q_top1": 100.0 * sum(t == cands[0] for t, cands in zip(targets, sets))
                       / max(len(sets), 1)}
    if corpus.toy is not None:
        toy, words = corpus.toy, corpus.vocab.decode
        valid = [[toy.mode(src, words(c)) is not None for c in cands]
                 for (src, _), cands in zip(getattr(corpus, split), sets)]
        notes["q_valid"] = 100.0 * sum(map(sum, valid)) / max(sum(map(len, valid)), 1)
        notes["q_sources_with_valid"] = 100.0 * sum(any(v) for v in valid) / max(len(valid), 1)
    return notes


@torch.no_grad()
def alignment_entropy(pairs, iterations=5, batch_size=2000):
    """Corpus-level multi-modality: fit IBM Model 1 word translation probabilities t(y|x) on the
    pairs (with a NULL source word), align every target token to its most likely source token, and
    return the conditional entropy H(Y|X) of the aligned (x, y) pairs in bits. A corpus whose
    sources are translated consistently one way scores low; one that mixes several valid
    translations of the same words scores high. (Zhou et al. 2020 use fast_align and average H(y|x)
    over source words; we weight by frequency, which is the H(Y|X) of the aligned pairs.)"""
    chunks, n_src, n_tgt = alignment_chunks(pairs, batch_size)
    prob = torch.full((n_src, n_tgt), 1.0 / n_tgt)                       # t(y|x), uniform start
    for _ in range(iterations):                                           # IBM-1's own EM
        counts = torch.zeros(n_src, n_tgt)
        for src, tgt in chunks:
            posterior = align_posterior(prob, src, tgt)                   # (batch, t_len, s_len)
            s_idx = src.clamp(min=0)[:, None, :].expand_as(posterior)
            t_idx = tgt.clamp(min=0)[:, :, None].expand_as(posterior)
            counts.index_put_((s_idx.reshape(-1), t_idx.reshape(-1)), posterior.reshape(-1),
                              accumulate=True)
        prob = counts / counts.sum(1, keepdim=True).clamp(min=1e-12)
    pair_counts = torch.zeros(n_src * n_tgt)
    for src, tgt in chunks:
        # (batch, t_len) aligned position
        best = align_posterior(prob, src, tgt).argmax(-1)
        x = src.clamp(min=0).gather(1, best)
        real = tgt >= 0
        pair_counts.index_add_(0, (x * n_tgt + tgt.clamp(min=0))[real], torch.ones(int(real.sum())))
    joint = pair_counts.view(n_src, n_tgt) / pair_counts.sum()
    given_x = joint / joint.sum(1, keepdim=True).clamp(min=1e-12)
    return float(-(joint * torch.log2(given_x.clamp(min=1e-12))).sum())


def alignment_chunks(pairs, batch_size):
    """The pairs as dense (src, tgt) index tensors in chunks of batch_size, -1 padded, source
    position 0 being NULL; and the source and target vocabulary sizes (NULL included)."""
    src_ids = sorted({w for s, _ in pairs for w in s})
    tgt_ids = sorted({w for _, t in pairs for w in t})
    src_index = {w: i + 1 for i, w in enumerate(src_ids)}              # 0 = NULL
    tgt_index = {w: i for i, w in enumerate(tgt_ids)}
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
    return chunks, len(src_ids) + 1, len(tgt_ids)


def align_posterior(prob, src, tgt):
    """IBM Model 1: p(a_j = i | x, y) proportional to t(y_j | x_i). src (batch, s_len), tgt
    (batch, t_len), -1 padded -> (batch, t_len, s_len), zero at padding."""
    # (batch, t_len, s_len)
    scores = prob[src.clamp(min=0)[:, None, :], tgt.clamp(min=0)[:, :, None]]
    scores = scores * (src >= 0)[:, None, :] * (tgt >= 0)[:, :, None]
    return scores / scores.sum(-1, keepdim=True).clamp(min=1e-12)


def entropy_sample(pairs, size, seed=0):
    """The pairs the alignment entropy is measured on: all of them up to `size`, else a fixed random
    sample of `size` (the same sources for every stage of a run, so that stages stay comparable)."""
    if size is None or len(pairs) <= size:
        return pairs
    keep = sorted(random.Random(seed).sample(range(len(pairs)), size))
    return [pairs[i] for i in keep]


# ------------------------------------------------------------------------------------------------
# Evaluation of a stage's model on the test split
# ------------------------------------------------------------------------------------------------
def repeat_rate(outputs):
    """Percentage of output tokens equal to the token before them: the NAR multi-modality
    symptom."""
    repeats = sum(a == b for out in outputs for a, b in zip(out, out[1:]))
    return 100.0 * repeats / max(sum(len(out) for out in outputs), 1)


def bleu_scores(test, outputs):
    """{"bleu": tokenised BLEU, and on the embedded task "valid_rate" (% exact valid translations),
    elsewhere "detok_bleu" and its sacreBLEU "signature"} of id outputs on the test split."""
    hyps = [test.text(out) for out in outputs]
    if test.corpus.toy is not None:
        valid_sets = [test.corpus.toy.valid_translations(s) for s, _ in test.pairs]
        refs = [list(r) for r in zip(*valid_sets)]                        # 6 reference sets
        score, _ = bleu(hyps, refs)
        rate = 100.0 * sum(h in v for h, v in zip(hyps, valid_sets)) / len(hyps)
        return {"bleu": score, "valid_rate": rate}
    refs = [[remove_bpe(" ".join(t)) if test.corpus.is_bpe else " ".join(t) for _, t in test.pairs]]
    tok_bleu, _ = bleu(hyps, refs, tokenized=True)
    detok, signature = bleu(hyps, refs, tokenized=False)
    return {"bleu": tok_bleu, "detok_bleu": detok, "signature": signature}


def targets_nll(nar_model, sources, targets, max_len, max_tokens, device, limit=2000):
    """The EM objective's view of multi-modality: the NAR model's negative log-likelihood per token,
    -log p_NAR(y|x) / |y| (length term included), of (up to `limit` of) the targets it was trained
    on. Targets that mix several translations of the same sources cannot all be likely: lower is
    simpler."""
    pairs = [(s, t) for s, t in zip(sources, targets) if 0 < len(t) <= max_len][:limit]
    return (-sum(score_pairs(nar_model, pairs, max_tokens, device))
            / max(sum(len(t) for _, t in pairs), 1))


def time_per_sentence(fn, sources, device):
    """Milliseconds per sentence of fn(src) over sources decoded one at a time (batch size 1)."""
    fn(pad_batch([sources[0]], device))                                   # warm-up
    synchronize(device)
    start = time.perf_counter()
    for s in sources:
        fn(pad_batch([s], device))
    synchronize(device)
    return (time.perf_counter() - start) * 1000 / len(sources)


def evaluate_ar(ar_model, test, beam, alpha):
    """AR beam search on the test split. Returns (result, {"beam": outputs})."""
    outs = translate_ids(ar_model, test.sources, method="beam", beam=beam, alpha=alpha,
                         max_tokens=test.max_tokens, device=test.device, precision=test.precision)
    return {**bleu_scores(test, outs), "repeats": repeat_rate(outs)}, {"beam": outs}


def evaluate_nar(nar_model, ar_model, test, beam, alpha, length_beam, speed_sentences):
    """NAR decoding with plain argmax, with ODD, and with ODD over a window of `length_beam` lengths
    rescored by the AR model (NPD); and the speed-up of NAR ODD over AR beam search at batch size 1,
    timed side by side on the first `speed_sentences` sentences (0: not timed).
    Returns (result, {"argmax": ..., "ODD": ..., "NPD": ...} outputs)."""
    common = dict(method="nar", max_tokens=test.max_tokens, device=test.device,
                  precision=test.precision)
    argmax = translate_ids(nar_model, test.sources, odd=False, **common)
    odd = translate_ids(nar_model, test.sources, odd=True, **common)
    rescored = translate_ids(nar_model, test.sources, odd=True, length_beam=length_beam,
                             rescorer=ar_model, alpha=alpha, **common)
    result = {**bleu_scores(test, odd), "repeats": repeat_rate(argmax), "ar_beam_ms": None,
              "nar_ms": None, "speedup": None}
    timed = test.sources[:speed_sentences]
    if timed:
        with torch.no_grad(), precision_context(test.device, test.precision):
            _, beam_search, nar = decoders(test.device)       # each on its fastest path
            ar_ms = time_per_sentence(lambda s: beam_search(ar_model, s, beam=beam, alpha=alpha),
                                      timed, test.device)
            nar_ms = time_per_sentence(lambda s: nar(nar_model, s), timed, test.device)
        result.update(ar_beam_ms=ar_ms, nar_ms=nar_ms, speedup=ar_ms / nar_ms)
    result["argmax"] = bleu_scores(test, argmax)
    result["rescored"] = bleu_scores(test, rescored)
    return result, {"argmax": argmax, "ODD": odd, "NPD": rescored}


def write_outputs(directory, test, outputs):
    """Each decoder's test-split outputs as text, one line per source, BPE removed and detokenised
    (the form to score with your own tools): <directory>/test.<decoder>.txt."""
    paths = []
    for method, outs in outputs.items():
        path = os.path.join(directory, f"{test.split}.{method}.txt")
        text = [test.text(out) if test.corpus.toy is not None else decode.detokenize(test.text(out))
                for out in outs]
        write_atomic(path, "".join(line + "\n" for line in text))
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------
# Printed examples: what the numbers mean, as text
# ------------------------------------------------------------------------------------------------
def marked_text(corpus, ids):
    """An output as text with every token that repeats the one before it in [brackets]: the NAR
    model's multi-modality symptom, made visible."""
    shown = []
    for i, word in enumerate(corpus.vocab.decode(ids)):
        if i and ids[i] == ids[i - 1]:
            # BPE pieces still join
            word = f"[{word[:-2]}]@@" if word.endswith("@@") else f"[{word}]"
        shown.append(word)
    text = " ".join(shown)
    return remove_bpe(text) if corpus.is_bpe else text


def validity_mark(corpus, src_words, text):
    """'   (valid)' or '   (invalid)' after an output on the embedded task; '' on real data."""
    if corpus.toy is None:
        return ""
    return "   (valid)" if text in corpus.toy.valid_translations(src_words) else "   (invalid)"


def format_examples(test, outputs, count):
    """The first `count` sentences of the test split: source, valid translations (embedded task) or
    reference, and each decoder's output."""
    corpus, lines = test.corpus, []
    words = (lambda w: remove_bpe(" ".join(w))) if corpus.is_bpe else " ".join
    for i in range(min(count, len(test.pairs))):
        src, ref = test.pairs[i]
        lines.append(f"  source     {words(src)}")
        if corpus.toy is not None:
            lines += [f"  {'valid' if j == 0 else '':<10} {t}"
                      for j, t in enumerate(corpus.toy.valid_translations(src))]
        else:
            lines.append(f"  reference  {words(ref)}")
        for method, outs in outputs.items():
            text = test.text(outs[i])
            shown = marked_text(corpus, outs[i]) if method == "argmax" else text
            lines.append(f"  {method:<10} {shown}{validity_mark(corpus, src, text)}")
        lines.append("")
    note = "  ([x] = a token repeating the one before it)\n" if "argmax" in outputs else ""
    return f"examples ({test.split} split):\n" + "\n".join(lines) + note


def format_e_step_example(corpus, index, nar_scores, candidates, ar_scores, q, selected):
    """One training source's E-step: its AR N-best with AR scores (length-normalised), which are in
    Q, the NAR model's score log p(y|x) of those in Q (nar_scores: one per member of q, -inf where
    it cannot be scored), validity (embedded task), and the selected one."""
    src_words = corpus.train[index][0]
    nar = {tuple(c): s for c, s in zip(q, nar_scores) if s > float("-inf")}
    lines = [f"E-step example: training source {index}: {' '.join(src_words)}",
             f"  {'AR score':>8} {'in Q':>4} {'NAR score':>9}  candidate"]
    for cand, score in zip(candidates, ar_scores):
        text = ids_to_text(cand, corpus.vocab, corpus.is_bpe)
        nar_cell = f"{nar[tuple(cand)]:9.2f}" if tuple(cand) in nar else f"{'':>9}"
        mark = "  <- selected" if cand == selected else ""
        lines.append(f"  {score:8.3f} {'yes' if cand in q else '':>4} {nar_cell}  {text}"
                     f"{validity_mark(corpus, src_words, text)}{mark}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------
def cell(value, width, digits=2, suffix=""):
    """A right-aligned table cell; blank where a column does not apply (None)."""
    return (f"{'':>{width}}" if value is None
            else f"{value:>{width - len(suffix)}.{digits}f}{suffix}")


def format_table(results, toy):
    """One row per stage: multi-modality of the training targets, quality, decoding speed-up."""
    header = (f"{'stage':<8} {'trained on':<34} {'H(y|x)':>7} {'NLL':>6} {'BLEU':>6} "
              f"{'argmax':>7} {'+resc':>6} "
              + (f"{'valid%':>7} " if toy else f"{'detok':>6} ") + f"{'rep%':>5} {'speed-up':>8}")
    lines = [header, "-" * len(header)]
    for r in results:
        nar = r["kind"] == "nar"
        row = [f"{r['stage']:<8}", f"{r['trained_on'][:34]:<34}", cell(r["targets_entropy"], 7, 3),
               cell(r["targets_nll"], 6, 3), cell(r["bleu"], 6),
               cell(r["argmax"]["bleu"] if nar else None, 7),
               cell(r["rescored"]["bleu"] if nar else None, 6),
               cell(r["valid_rate"], 7, 1) if toy else cell(r["detok_bleu"], 6),
               cell(r["repeats"], 5, 1),
               cell(r.get("speedup") if nar else None, 8, 1, "x")]
        lines.append(" ".join(row))
    return "\n".join(lines)


def format_modes_table(results):
    """Embedded task: what each stage's training targets are, and what the E-step's Q held."""
    header = (f"{'stage':<8} {'mode shares % (6 valid translations)':<38} {'H(mode)':>7} "
              f"{'invalid%':>8} {'|Q|':>5} {'Q valid%':>8} {'srcs w/ valid%':>14} {'=top1%':>6}")
    lines = [header, "-" * len(header)]
    for r in results:
        shares = " ".join(f"{p:5.1f}" for p in r["mode_shares"])
        lines.append(f"{r['stage']:<8} {shares:<38} {r['mode_entropy']:>7.3f} {r['invalid']:>8.1f} "
                     f"{cell(r.get('q_size'), 5, 1)} {cell(r.get('q_valid'), 8, 1)} "
                     f"{cell(r.get('q_sources_with_valid'), 14, 1)} {cell(r.get('q_top1'), 6, 1)}")
    return "\n".join(lines)


TABLE_NOTES = """\
columns: H(y|x) = lexical multi-modality of the stage's training targets (IBM-1 alignment
entropy, bits); NLL = the NAR model's -log p(y|x) per token of its own training targets (the EM
objective); BLEU = AR beam search / NAR ODD decoding on the {split} split{bleu_kind}; argmax = NAR \
plain
argmax; +resc = NAR ODD over a length window rescored by the AR model (NPD);{valid} rep% = repeated
adjacent tokens (AR beam / NAR argmax outputs); speed-up = NAR ODD vs AR beam search, batch size 1,
timed side by side."""

MODES_NOTES = """\
mode shares = which of the six valid translations the training targets are (formal/casual x
none/opening/closing framing); H(mode) = their entropy in bits (2.58 = uniform, 0 = one mode);
invalid% = targets that are no valid translation; |Q| = mean candidates per source in the E-step's
set Q; Q valid% = valid translations among them; srcs w/ valid% = sources whose Q holds one;
=top1% = selected targets that are the AR model's own top-1 (where the E-step changed nothing)."""


def format_results(results, test):
    """The run's tables with their notes, as printed at the end of a run; and the tables alone (for
    results.txt)."""
    toy = test.corpus.toy is not None
    table = format_table(results, toy)
    notes = TABLE_NOTES.format(
        split=test.split,
        bleu_kind=(" (multi-reference: all 6 valid translations)" if toy
                   else " (tokenised, BPE removed)"),
        valid=" valid% = exact valid translations;" if toy else
        " detok = sacreBLEU on em-nat's detokenised output against the detokenised references "
        "(not raw\n"
        "references: comparable within this table, not with published sacreBLEU scores);")
    shown = (f"\nevaluated on the {test.split} split ({len(test.sources)} sentences)\n"
             f"{table}\n{notes}")
    if toy:
        modes = format_modes_table(results)
        shown += "\n\n" + modes + "\n" + MODES_NOTES
        table += "\n\n" + modes
    else:
        shown += f"\ndetok signature: {results[0]['signature']}"
        for r in results:
            if "q_size" in r:
                shown += (f"\n{r['stage']}: E-step Q held {r['q_size']:.1f} candidates per source; "
                          f"{r['q_top1']:.1f}% of the selections are the AR model's own top-1")
    return shown, table


def format_margin_table(rows, toy):
    """The margin study (em_nat.margin_study): one row per (sources, margin)."""
    columns = ([("|Q|", "q_size", 1), ("Q valid%", "q_valid", 1), ("sel. invalid%", "invalid", 1),
                ("H(mode)", "mode_entropy", 3), ("=top1%", "q_top1", 1)] if toy else
               [("|Q|", "q_size", 1), ("=top1%", "q_top1", 1),
                ("sent-BLEU vs ref", "sentence_bleu", 2)])
    header = f"{'sources':<8} {'margin':>6} " + " ".join(f"{name:>{max(len(name), 6)}}"
                                                         for name, _, _ in columns)
    lines = ["the first E-step (Q from AR_0's N-best, selected by NAR_0) for each quality margin, "
             "on the training sources and on held-out ones (margin 0: the AR top-1 alone, i.e. "
             "distillation)", header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['sources']:<8} "
                     f"{str(r['margin'] if r['margin'] is not None else 'none'):>6} " +
                     " ".join(f"{r[key]:>{max(len(name), 6)}.{d}f}" for name, key, d in columns))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Over seeds: mean [min, max] of every stage's headline figures
# ------------------------------------------------------------------------------------------------
def spread(values, digits=2):
    """'mean [min, max]' of a list of numbers (blank when there are none)."""
    if not values:
        return ""
    return (f"{sum(values) / len(values):.{digits}f} "
            f"[{min(values):.{digits}f}, {max(values):.{digits}f}]")


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
        ("+resc", nar_only(lambda r: r["rescored"]["bleu"]), 2),
        ("NLL", lambda r: r["targets_nll"], 3)]),)


def format_seed_summary(by_stage, toy, seeds):
    """Mean [min, max] over the seeds of each stage's headline figures, stages in run order: one
    table for the models' quality and (embedded task) one for their training targets and the
    E-step's Q. by_stage: {(selection, stage): [result of each seed]}."""
    lines = [f"over seeds {', '.join(map(str, seeds))}: mean [min, max] (test split)"]
    for title, columns in (SEED_COLUMNS_TOY if toy else SEED_COLUMNS_REAL):
        header = (f"{'selection':<9} {'stage':<8} "
                  + " ".join(f"{name:>21}" for name, _, _ in columns))
        lines += ["", title, header, "-" * len(header)]
        for (selection, stage), results in by_stage.items():
            cells = [spread([v for v in map(get, results) if v is not None], digits)
                     for _, get, digits in columns]
            lines.append((f"{selection:<9} {stage:<8} "
                          + " ".join(f"{c:>21}" for c in cells)).rstrip())
    if len(seeds) > 1:
        lines += ["", format_paired_differences(by_stage, toy, seeds)]
    return "\n".join(lines)


def paired_comparisons(by_stage):
    """The comparisons a study over seeds is run for, each (label, setting, baseline) of by_stage's
    keys: every EM iteration's NAR model against NAR_0 (does EM beat distillation?), and the
    paper's E-step against each control at the same stage (does the NAR model's choice matter?)."""
    comparisons = []
    for selection, stage in by_stage:
        if not (stage.startswith("em") and stage.endswith("-nar")):
            continue
        if selection == "nar" and ("nar", "nar-kd") in by_stage:
            comparisons.append((f"{stage} - nar-kd", ("nar", stage), ("nar", "nar-kd")))
        elif selection != "nar" and ("nar", stage) in by_stage:
            comparisons.append((f"{stage}: nar - {selection}", ("nar", stage), (selection, stage)))
    return comparisons


def paired_difference(values, baseline):
    """Seed by seed differences of two settings run on the same seeds, their mean, and twice the
    standard error of that mean (sample standard deviation / sqrt(n); None for one seed): a mean
    difference beyond it is distinguishable from zero."""
    diffs = [v - b for v, b in zip(values, baseline)]
    mean = sum(diffs) / len(diffs)
    if len(diffs) < 2:
        return diffs, mean, None
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    return diffs, mean, 2 * sd / math.sqrt(len(diffs))


def format_paired_differences(by_stage, toy, seeds):
    """One row per paired comparison (paired_comparisons): the per-seed differences of the NAR
    models' headline measure (valid% with ODD decoding on the embedded task, BLEU on real data),
    their mean, twice its standard error and on how many seeds the setting is ahead."""
    name, key = ("valid% (ODD)", "valid_rate") if toy else ("BLEU", "bleu")
    header = (f"{'comparison':<28} " + " ".join(f"{'seed ' + str(s):>8}" for s in seeds)
              + f" {'mean':>7} {'2 SE':>6} {'ahead':>8}")
    lines = [f"paired differences of {name}, seed by seed (2 SE: twice the standard error of "
             f"the mean difference; a mean beyond it is distinguishable from zero)", header,
             "-" * len(header)]
    for label, setting, baseline in paired_comparisons(by_stage):
        values = [r[key] for r in by_stage[setting]]
        base = [r[key] for r in by_stage[baseline]]
        if len(values) != len(seeds) or len(base) != len(seeds):
            continue                                  # a setting not run on every seed
        diffs, mean, two_se = paired_difference(values, base)
        ahead = f"{sum(d > 0 for d in diffs)} of {len(diffs)}"
        lines.append(f"{label:<28} " + " ".join(f"{d:>+8.1f}" for d in diffs)
                     + f" {mean:>+7.2f} {'' if two_se is None else f'{two_se:.2f}':>6} {ahead:>8}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Training and N-best throughput (the yardstick against other toolkits)
# ------------------------------------------------------------------------------------------------
def training_throughput(kind, preset, vocab_size, pairs, batches, cfg: TrainConfig, steps):
    """Target tokens per second and seconds per step of `steps` AdamW steps of a `kind` model on
    token-budget batches, after 3 warm-up steps (the allocator; with cfg.compile, the compilation),
    and the warm-up's seconds. The AR model also predicts <eos>, which is counted, as fairseq counts
    it."""
    torch.manual_seed(0)
    model = build_model(model_config(preset, vocab_size, kind), cfg.device).train()
    optimizer = make_optimizer(model, cfg)
    net = compiled(model, cfg)
    tokens, seconds, warmup = 0, 0.0, 0.0
    for i, batch in enumerate(progress_bar(batches[:steps + 3], desc=f"train {kind}")):
        start = time.perf_counter()
        src, tgt = collate([pairs[j] for j in batch], cfg.device)
        _, n = forward_backward(net, src, tgt, cfg, f"benchmark {kind}")
        optimizer_step(model, optimizer, cfg)
        n = int(n)                                             # waits for the step to finish
        if i >= 3:
            tokens += n + (len(batch) if kind == "ar" else 0)
            seconds += time.perf_counter() - start
        else:
            warmup += time.perf_counter() - start
    return tokens / seconds, seconds / steps, warmup, count_parameters(model)


def nbest_throughput(preset, vocab_size, pairs, n, decode_tokens, device, precision):
    """Sentences per second of AR n-best beam search (beam n), the E-step's decoding. Random
    weights: the <eos> logit is pushed down until the forced end at the reference length, so that
    the search takes as many steps as a trained model's would."""
    torch.manual_seed(0)
    ar = build_model(model_config(preset, vocab_size, "ar", dropout=0.0), device).eval()
    with torch.no_grad():
        ar.out_bias[EOS] = -1e4
    beam_search = decoders(device)[1]                                   # the E-step's decoder
    start = time.perf_counter()
    for batch in progress_bar(make_batches([len(s) for s, _ in pairs], max(decode_tokens // n, 1)),
                              desc="N-best"):                        # as decode.nbest batches
        src = pad_batch([pairs[j][0] for j in batch], device)
        out_len = torch.tensor([len(pairs[j][1]) for j in batch], device=device)
        with torch.no_grad(), precision_context(device, precision):
            beam_search(ar, src, beam=n, nbest=n, max_len=out_len)
    synchronize(device)
    return len(pairs) / (time.perf_counter() - start)


def nbest_memory(pairs, n, seed=0):
    """Host memory of the E-step's N-best of every training source, measured with tracemalloc on a
    stand-in N-best (n candidates per source, each as long as the source's reference, random ids):
    as Python lists of ints (how em-nat held it before) and as decode.NBest arrays. Returns
    (bytes per candidate token as lists, as arrays, candidate tokens)."""
    rng = random.Random(seed)
    lengths = [len(t) for _, t in pairs for _ in range(n)]
    measured = []
    for build in (lambda: [[rng.randrange(4, 30000) for _ in range(k)] for k in lengths],
                  lambda: nbest_arrays(lengths, n, rng)):
        tracemalloc.start()
        kept = build()
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        measured.append(size / max(sum(lengths), 1))
        del kept
    return measured[0], measured[1], sum(lengths)


def nbest_arrays(lengths, n, rng):
    """A stand-in decode.NBest built the way decode.nbest builds one: per-sentence arrays, then
    flat."""
    rows = [(np.array([[rng.randrange(4, 30000) for _ in range(k)]
                       + [PAD] * (max(lengths[i:i + n]) - k)
                       for k in lengths[i:i + n]], dtype=np.int32),
             np.zeros(n, dtype=np.float32))
            for i in range(0, len(lengths), n)]
    return NBest.from_rows(n, rows)


def benchmark(corpus, preset, cfg: TrainConfig, steps, sentences, candidates, decode_tokens):
    """The throughput table on a corpus: what a batch holds, AR and NAR training tokens/s and their
    step-time ratio, and N-best sentences/s. Returns its rows (name, figure)."""
    pairs = corpus.ids("train")
    batches = make_batches([max(len(s), len(t)) + 1 for s, t in pairs], cfg.max_tokens,
                           random.Random(0))
    rows = [(f"a {cfg.max_tokens}-token batch holds (mean over {len(batches)})",
             f"{len(pairs) / len(batches):,.1f} pairs, "
             f"{sum(len(t) + 1 for _, t in pairs) / len(batches):,.0f} "
             f"target tokens")]                                           # +1: <eos>
    step_time = {}
    for kind in ("ar", "nar"):
        tokens_per_s, step_time[kind], warmup, parameters = training_throughput(
            kind, preset, len(corpus.vocab), pairs, batches, cfg, steps)
        rows.append((f"train {kind.upper()} ({parameters / 1e6:.1f}M parameters)",
                     f"{tokens_per_s:,.0f} target tokens/s"))
        if cfg.compile:
            rows.append((f"  its 3 warm-up steps, compilation included", f"{warmup:,.1f} s"))
    rows.append(("NAR / AR time per step (same batches)",
                 f"{step_time['nar'] / step_time['ar']:.2f}"))
    valid = corpus.ids("valid")[:sentences]
    per_s = nbest_throughput(preset, len(corpus.vocab), valid, candidates, decode_tokens,
                             cfg.device, cfg.precision)
    rows.append((f"AR {candidates}-best beam search ({len(valid)} sentences)",
                 f"{per_s:,.1f} sentences/s"))
    as_lists, as_arrays, tokens = nbest_memory(pairs, candidates)
    rows.append((f"E-step {candidates}-best in host memory ({tokens / 1e6:.1f}M tokens)",
                 f"{as_lists:.1f} B/token as lists, {as_arrays:.1f} as arrays"))
    print()
    for name, figure in rows:
        print(f"{name:<52} {figure:>34}")
    return rows
