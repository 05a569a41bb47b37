"""em_nat.py: the EM approach to non-autoregressive translation (Sun & Yang, ICML 2020), top
to bottom.

A NAR model emits every target token at once; trained on real translations, which hold several valid
ways to say one thing ("modes"), it mixes them. The paper trains an AR and a NAR model together:

    E-step  within Q, a quality-constrained set of targets (in practice the AR model's N-best),
            take for each source the candidate the current NAR model likes best; a new AR model
            learns them.
    M-step  the NAR model learns that AR model's beam outputs (sequence-level distillation).

Iterating makes the targets more consistent (less multi-modal) and easier for the NAR model. Here
each model is one resumable "stage" of a run directory:

    stage      trains                 on the targets
    ar         AR_0                   the real training data
    nar-raw    NAR (baseline)         the real training data: suffers from multi-modality
    nar-kd     NAR_0                  AR_0's beam outputs (distillation: the paper's starting point)
    em{i}-ar   AR_i  (E-step)         within Q_i (AR_{i-1}'s N-best, quality-constrained), the
                                      candidates NAR_{i-1} likes best
    em{i}-nar  NAR_i (M-step)         AR_i's beam outputs

Reading order: the configuration; the EM steps (distillation, the set Q, the selection and its
controls, the E-step); `em_loop`, the paper's algorithm; then the stage runner (train, evaluate,
save, resume), the studies over a finished run, and the command line (`python train.py --help`).
model.py holds the two models, decode.py their decoders, train.py the training loop, report.py the
measures and tables.
"""
import argparse
import json
import os
import random
import shutil
import sys
from array import array
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

import report
from data import TASKS, BPE, DataError, Vocab, load_corpus_dir, make_toy_corpus, read_lines
from decode import (NBest, default_decode_tokens, ids_to_text, nbest, score_pairs, sentence_bleu,
                    translate_ids)
from model import (PRESETS, UNK, CheckpointError, build_model, check_device,
                   keep_freed_memory_on_cpu, load_checkpoint, model_config, resolve_precision,
                   write_atomic)
from options import HelpFormatter, add_options, check_minimums, option, values
from train import (TRAIN_PRESETS, Stopped, TrainConfig, TrainingError, all_parts, barrier,
                   from_main, gather, is_main, process_device, remove_loop_files, shard,
                   start_processes, stop_processes, train_model, world_size)

SELECTIONS = ("nar", "random", "ar-top1", "nar-crossfit")
CONTROLS = ("random", "ar-top1")          # what --controls adds to the paper's selection
RUN_FORMAT = 2                    # run.json's layout; a run directory of another layout is refused


# ------------------------------------------------------------------------------------------------
# Configuration. A field declared with `option` is also an option of `python train.py` (its help
# says what it does); the command line at the end of this file fills them.
# ------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    data_dir: str = option(None, "corpus directory in the fairseq layout (train/valid/test.SRC/"
                                 ".TGT, tokenised text); default: the embedded toy task, generated "
                                 "from --seed")
    task: str = option("toy", "the embedded task when there is no --data-dir: " +
                       "; ".join(f"{name}: {spec.about}"
                                 for name, spec in TASKS.items()).replace("%", "%%"),
                       choices=sorted(TASKS))
    src: str = option("de", "source language suffix")
    tgt: str = option("en", "target language suffix")
    bpe_merges: int = option(10000, "joint BPE merges learned on plain text (0: use the text as it "
                                    "is)")
    max_len: int = option(None, "longest sentence in tokens (positions, length classes); longer "
                                "training pairs are dropped (default: the preset's)")
    max_train_pairs: int = option(None, "use only the first N training pairs (default: all)")
    toy_train_size: int = option(None, "training pairs of the embedded task (default: the task's, "
                                       "6000 for toy)", minimum=1)
    distillation_targets: str = option(
        None, "the first NAR model's targets, precomputed (e.g. by a stronger teacher): one line "
              "per line of train.SRC, tokenised as train.TGT (default: AR_0's beam outputs)",
        metavar="FILE")


def margin_value(text):
    """--quality-margin: a number of nats, '<c>x' (c times the AR top-1's own length-normalised
    negative log-probability), or 'none' (no margin)."""
    if text.lower() == "none":
        return None
    scaled = text.endswith("x")
    try:
        value = float(text[:-1] if scaled else text)
    except ValueError:
        value = float("nan")                    # not a number: refused below, with negatives
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of nats (e.g. 1), a multiple of the "
                                         f"AR top-1's -score (e.g. 0.5x) or 'none', got {text!r}")
    return f"{value:g}x" if scaled else value


@dataclass
class EMConfig:
    iterations: int = option(2, "EM iterations after distillation", flag="--em-iterations",
                             metavar="N", minimum=0)
    # the official code: 20
    candidates: int = option(20, "AR N-best candidates per source (E-step)", minimum=1)
    quality_margin: float = option(
        1.0, "the E-step's set Q keeps the N-best candidates within this many nats "
             "(length-normalised AR score) of the AR model's best; 'Cx' (e.g. 0.5x): within C "
             "times the best's own -score, so Q narrows where the AR model is confident; 'none' "
             "keeps all N, as the official code", type=margin_value, metavar="NATS|Cx|none")
    selection: str = option(
        "nar", "E-step choice within Q: the NAR model's favourite (the paper), or a control: a "
               "random candidate, the AR model's own top-1, or nar-crossfit: the favourite of NAR "
               "models that never trained on the source (a control for memorisation; costs K extra "
               "NAR trainings per E-step)", choices=SELECTIONS)
    crossfit_folds: int = option(2, "with --selection nar-crossfit: K folds of the training "
                                    "sources, one NAR model each", metavar="K", minimum=1)
    kd_beam: int = option(5, "beam of the AR outputs that train NAR models", minimum=1)
    alpha: float = option(1.0, "length penalty exponent of AR beam search and rescoring (default: "
                               "1.4, the paper's IWSLT14 value, with the iwslt preset; else 1.0)",
                          cli_default=None)
    init: str = option("scratch", "each EM iteration's models start from scratch or from the "
                                  "previous iteration's", flag="--em-init",
                       choices=["scratch", "warm"])


@dataclass
class ReportConfig:
    beam: int = option(5, "AR beam size when evaluating", minimum=1)
    length_beam: int = option(9, "NAR length candidates rescored by the AR model (NPD, the +resc "
                                 "column; the paper: 9)", minimum=1)
    entropy_pairs: int = option(20000, "training pairs the H(y|x) column is measured on (a fixed "
                                       "random sample beyond that)", minimum=1)
    speed_sentences: int = option(50, "test sentences timed at batch size 1 for the speed-up "
                                      "column (0: not timed)", minimum=0)
    examples: int = option(2, "test sentences printed as text after each stage, with one source's "
                              "E-step candidates (0: none)", minimum=0)


@dataclass
class RunConfig:
    out: str = option(None, "run directory (default: runs/<data>-<preset>); re-running resumes it")
    preset: str = option(None, "model size and schedule, listed below (default: toy on the toy "
                               "task, iwslt with --data-dir)", choices=sorted(PRESETS),
                         group="model and training")
    seed: int = option(1, "seed of the toy data, the weights and the batches")
    threads: int = option(None, "CPU threads (default: torch's, usually the number of cores); "
                                "figures on the CPU change a little with it", minimum=1)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    em: EMConfig = field(default_factory=EMConfig)
    report: ReportConfig = field(default_factory=ReportConfig)


@dataclass
class Studies:
    """What the command does besides running the pipeline once (main reads these)."""
    seeds: list = option(None, "run the pipeline once per seed (in OUT/seed<N>) and print each "
                               "stage's mean, min and max", type=int, nargs="+", metavar="SEED")
    controls: bool = option(False, "with --seeds: also run the E-step controls (random and AR "
                                   "top-1 selection) on every seed")
    margin_study: bool = option(False, "read a finished run (--out and its options) and print how "
                                       "each quality margin shapes its first E-step (Q's size, the "
                                       "selections, their quality), then exit")
    benchmark: bool = option(False, "measure AR/NAR training throughput and N-best beam search "
                                    "speed on the corpus of --data-dir, then exit")
    benchmark_steps: int = option(20, "training steps timed per model")
    benchmark_sentences: int = option(200, "sentences decoded for N-best speed")


# ------------------------------------------------------------------------------------------------
# The EM steps
# ------------------------------------------------------------------------------------------------
def distil(run, ar_model):
    """Sequence-level knowledge distillation, the M-step's targets: the AR model's beam-search
    translation of every training source (each process translates its shard; all get the whole
    list)."""
    return gather(translate_ids(ar_model, shard(run.train_sources), method="beam",
                                beam=run.em.kd_beam, alpha=run.em.alpha,
                                max_tokens=run.decode_tokens, device=run.device,
                                progress=is_main(), precision=run.precision))


def first_distillation_targets(run, ar_model):
    """The first NAR model's targets (stage nar-kd): AR_0's beam outputs, or the precomputed targets
    the user brings (DataConfig.distillation_targets)."""
    if run.cfg.data.distillation_targets is None:
        return distil(run, ar_model)
    return run.read_distillation_targets(run.cfg.data.distillation_targets)


def ar_nbest(run, ar_model, sources):
    """The AR model's N best beam-search candidates of every source, and their length-normalised
    scores (a decode.NBest: compact arrays): what the E-step's Q is drawn from."""
    part = nbest(ar_model, shard(sources), run.em.candidates, alpha=run.em.alpha,
                 max_tokens=run.decode_tokens, device=run.device, progress=is_main(),
                 precision=run.precision)
    return NBest.interleave(all_parts(part))


def quality_constrained_set(candidates, ar_scores, margin):
    """The E-step's set Q for one source: its AR N-best candidates (good translations by
    construction, as in the official code) that are also within `margin` nats of the AR model's best
    length-normalised score (None: no margin). The paper's constraint asks for targets of high
    expected quality; the margin makes that explicit where the N-best list reaches far below the AR
    model's own choice. Candidates whose AR score is -inf (a beam wider than the output space holds
    no real hypothesis there) are never in Q."""
    real = [(c, s) for c, s in zip(candidates, ar_scores) if s > float("-inf")]
    if margin is None:
        return [c for c, _ in real]
    best = max(s for _, s in real)
    return [c for c, s in real if s >= best - margin_nats(margin, best)]


def margin_nats(margin, best):
    """The margin in nats for a source whose AR top-1 scores `best`: a number of nats, or "<c>x",
    c times -best, the top-1's own length-normalised negative log-probability (a margin scaled by
    the AR model's confidence: Q narrows to the top-1 where the AR model is sure of it, and widens
    where it is not)."""
    if isinstance(margin, str):
        return float(margin[:-1]) * -best
    return margin


def nar_scores(run, nar_model, pairs):
    """Sentence log-likelihoods log p_NAR(y|x) of (source, target) id pairs, in the order of
    `pairs`. Under torchrun every process scores its share and the scores are gathered, so every
    process must call it."""
    return gather(score_pairs(nar_model, shard(pairs), run.decode_tokens, run.device,
                              run.precision))


# >>> exercise 7: the E-step's selection
def candidate_nar_scores(run, nar_model, sources, sets):
    """The full NAR log-likelihood log p(T|x) + sum_t log p(y_t|x,T) (no token masked, NOT
    length-normalised, output layer in float32: Transformer.score) of every candidate in every
    source's set, as one list per set; -inf where the NAR model cannot score the candidate (empty:
    no training target is, or longer than its max_len; a candidate of exactly max_len tokens is
    scored). Scored as nar_scores scores: the model in eval mode (dropout would make the scores
    noisy, and the E-step compares them), under the run's precision (precision_context(run.device,
    run.precision): bf16 autocast in a bf16 run). The reference scores all pairs in one batched
    call of nar_scores; any computation that gives the same scores passes."""
    flat = [(i, j) for i, cands in enumerate(sets) for j, cand in enumerate(cands)
            if 0 < len(cand) <= nar_model.cfg.max_len]
    flat_scores = nar_scores(run, nar_model, [(sources[i], sets[i][j]) for i, j in flat])
    scores = [[float("-inf")] * len(cands) for cands in sets]
    for (i, j), score in zip(flat, flat_scores):
        scores[i][j] = score
    return scores


def best_candidates(sets, scores):
    """Each set's candidate of highest score, and that score. Returns (selected, best scores). Of
    equal scores the earlier candidate wins (the AR model ranked it higher); a set whose candidates
    all score -inf keeps its first."""
    picks = [max(range(len(row)), key=row.__getitem__) for row in scores]
    return [cands[j] for cands, j in zip(sets, picks)], [row[j] for row, j in zip(scores, picks)]
# <<< exercise 7


def select(selection, sets, scores, seed):
    """The E-step's choice within Q: the NAR model's favourite (the paper), or a control: a random
    member of Q, or the AR model's own top-1 (one more round of distillation from a retrained AR
    model)."""
    if selection in ("nar", "nar-crossfit"):
        return best_candidates(sets, scores)[0]
    if selection == "random":
        rng = random.Random(seed)
        return [rng.choice(cands) for cands in sets]
    # ar-top1: the N-best is sorted
    return [cands[0] for cands in sets]


@dataclass
class EStep:
    """What an E-step computed: the targets, and how (the N-best, Q, the NAR scores of Q)."""
    targets: list                 # one per training source
    # the AR N-best of every source, with their length-normalised scores
    nbest: NBest
    sets: list                    # Q of every source
    nar_scores: list              # log p_NAR of every member of Q (-inf: cannot be scored)


def e_step(nbest, score, em, seed):
    """The E-step (official score_nat.py + data_selection.py): Q = the AR model's N-best (a
    decode.NBest) under the quality constraint, and the targets = the candidate of Q that `score`
    rates highest (or a control's choice: em.selection). score(sets) gives every candidate of every
    set its log-likelihood under the NAR model (candidate_nar_scores); seed: the random control's
    draw."""
    sets = [quality_constrained_set(nbest.candidates(i), nbest.scores[i].tolist(),
                                    em.quality_margin)
            for i in range(len(nbest))]
    scores = score(sets)
    return EStep(select(em.selection, sets, scores, seed), nbest, sets, scores)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def em_loop(run):
    """The paper's algorithm, as calls of run.stage(name, kind, trained_on, make_targets,
    init_from=None, rescorer=None). Each trains one model of `kind` ("ar" or "nar") on the
    targets make_targets() returns (one per training source; of an E-step, e_step's result as it
    is), starting from the model of the stage handle `init_from` (None: from scratch), and
    evaluates it: a NAR model also by NPD, rescored by the AR model of the stage handle
    `rescorer`. trained_on describes the targets in the summary table. A finished stage is read
    back from its directory and its make_targets is not called: compute targets, and load models
    (handle.model()), only inside make_targets, so that a resumed run recomputes nothing.
    run.stage returns the stage's handle (.name; .model() loads its model). The stages, in order
    (AR_0 = ar, NAR_0 = nar-kd):
      ar         AR_0 on the real targets (run.train_ids: (source, target) pairs)
      nar-raw    the NAR baseline on the real targets; rescorer: ar
      nar-kd     NAR_0 on first_distillation_targets(run, AR_0's model): AR_0's beam outputs
                 (distil), or the precomputed targets of --distillation-targets; rescorer: ar
      then for each EM iteration i = 1 .. run.em.iterations:
      em{i}-ar   AR_i, from AR_{i-1}, on the E-step's targets: run.e_step(name, AR_{i-1}'s
                 handle, NAR_{i-1}'s handle, i), e_step on AR_{i-1}'s N-best (Q) scored by
                 NAR_{i-1}; no rescorer
      em{i}-nar  NAR_i, from NAR_{i-1}, on distil(run, AR_i's model) (the M-step); rescorer: AR_i
    Returns run.results."""
    # >>> exercise 8: the EM loop
    real = [t for _, t in run.train_ids]
    ar = run.stage("ar", "ar", "real data", lambda: real)                             # AR_0
    # the NAR baseline
    run.stage("nar-raw", "nar", "real data", lambda: real, rescorer=ar)
    kd = ("AR beam outputs (KD)" if run.cfg.data.distillation_targets is None
          else "precomputed KD targets")
    # NAR_0
    nar = run.stage("nar-kd", "nar", kd, lambda: first_distillation_targets(run, ar.model()),
                    rescorer=ar)
    for i in range(1, run.em.iterations + 1):
        prev_ar, prev_nar = ar, nar
        # E-step: within Q (AR_{i-1}'s N-best), the targets NAR_{i-1} likes best; AR_i learns them.
        ar = run.stage(f"em{i}-ar", "ar", f"{prev_ar.name} N-best, {run.em.selection} selection",
                       lambda: run.e_step(f"em{i}-ar", prev_ar, prev_nar, i), init_from=prev_ar)
        # M-step: NAR_i learns AR_i's outputs.
        nar = run.stage(f"em{i}-nar", "nar", f"{ar.name} beam outputs",
                        lambda: distil(run, ar.model()), init_from=prev_nar, rescorer=ar)
    return run.results
    # <<< exercise 8


# ------------------------------------------------------------------------------------------------
# A control for memorisation: cross-fitted selection (not the paper's)
# ------------------------------------------------------------------------------------------------
def crossfit_folds(sources, k, seed):
    """The fold (0..k-1) of every training source: a fixed random partition of the distinct sources
    into k near-equal folds (a source that occurs twice is in one fold)."""
    distinct = sorted({tuple(s) for s in sources})
    random.Random(seed).shuffle(distinct)
    fold_of = {s: rank % k for rank, s in enumerate(distinct)}
    return [fold_of[tuple(s)] for s in sources]


def crossfit_scores(run, stage, judged_like, seed, sets):
    """The NAR scores of a cross-fitted E-step (a control for memorisation): K NAR models, model k
    trained like the NAR model of stage `judged_like` (its targets and steps) on the sources outside
    fold k, score the candidates of fold k's sources, so no candidate is judged by a model that
    trained on its source. Each fold's scores are computed once into <stage>/fold<k>.json (its model
    into <stage>/fold<k>/)."""
    targets = run.read_ids(os.path.join(run.stage_dir(judged_like), "train.tgt"))
    folds = crossfit_folds(run.train_sources, run.em.crossfit_folds, seed)
    scores = [None] * len(sets)
    for k in range(run.em.crossfit_folds):
        held = [i for i, f in enumerate(folds) if f == k]
        trained = [i for i, f in enumerate(folds) if f != k]
        compute = lambda: candidate_nar_scores(run,
                                               train_fold_model(run, stage, k, trained, targets),
                                               [run.train_sources[i] for i in held],
                                               [sets[i] for i in held])
        for i, row in zip(held, run.cached(stage, f"fold{k}.json", compute, write_json, read_json)):
            scores[i] = row
    return scores


# ------------------------------------------------------------------------------------------------
# The stage runner: a run directory, its data, and one stage at a time
# ------------------------------------------------------------------------------------------------
class LazyModel:
    """A stage's model, loaded from its directory on first use."""

    def __init__(self, run, name, model=None):
        self.run, self.name, self._model = run, name, model

    def model(self):
        if self._model is None:
            self._model = load_checkpoint(self.run.stage_dir(self.name), self.run.device)[0]
        return self._model


class Run:
    """A run: its configuration, its data, and its directory (one subdirectory per stage, whose
    saved artefacts `cached` reads back on resume)."""

    def __init__(self, cfg: RunConfig):
        self.cfg, self.em, self.dir = cfg, cfg.em, cfg.out
        self.device, self.precision = cfg.train.device, cfg.train.precision
        self.max_len = cfg.data.max_len or model_config(cfg.preset, 0, "ar").max_len
        self.decode_tokens = decoding_budget(cfg.train)
        os.makedirs(self.dir, exist_ok=True)
        # under torchrun rank 0 first learns the BPE and writes run.json; the other processes then
        # read them
        if not is_main():
            barrier()
        self.corpus = load_corpus(cfg, self.dir, self.max_len)
        check_run_dir(self.dir, run_settings(cfg, self.corpus, self.max_len), self.corpus.vocab)
        if is_main():
            barrier()
        self.train_ids = self.corpus.ids("train")
        self.train_sources = [s for s, _ in self.train_ids]
        # The validation split chooses checkpoints (its loss needs pairs the model can hold); every
        # stage is evaluated on the test split, as the paper reports, or on validation where no test
        # split exists.
        self.valid_loss_pairs = validation_pairs(self.corpus, self.max_len)
        if cfg.data.distillation_targets is not None:
            # refused now, not after AR_0
            self.read_distillation_targets(cfg.data.distillation_targets)
        self.test = report.TestSet(self.corpus, "test" if self.corpus.test else "valid",
                                   self.max_len, self.decode_tokens, self.device, self.precision)
        self.results = []

    def stage_dir(self, name):
        return os.path.join(self.dir, name)

    def cached(self, stage, name, compute, write, read):
        """A stage's artefact `name`: computed once (compute()) and written by rank 0 (write(path,
        value)), or read back (read(path)) when the stage resumes. Every process gets the value."""
        os.makedirs(self.stage_dir(stage), exist_ok=True)
        path = os.path.join(self.stage_dir(stage), name)
        saved = os.path.isfile(path)
        # every process has looked before rank 0 writes
        barrier()
        if saved:
            return read(path)
        value = compute()
        if is_main():
            write(path, value)
        return value

    def e_step(self, stage, ar, nar, iteration):
        """E-step `iteration` as the targets of `stage`: the paper's e_step on the N-best of the AR
        model `ar` (saved in the stage's directory, read back on resume), scored by the NAR model
        `nar`, or with --selection nar-crossfit by NAR models trained like it that never saw the
        source."""
        nbest = self.cached(stage, "candidates.tgt",
                            lambda: ar_nbest(self, ar.model(), self.train_sources),
                            self.write_nbest, self.read_nbest)
        seed = self.cfg.seed * 7919 + iteration
        if self.em.selection == "nar-crossfit":
            score = lambda sets: crossfit_scores(self, stage, nar.name, seed, sets)
        else:
            score = lambda sets: candidate_nar_scores(self, nar.model(), self.train_sources, sets)
        return e_step(nbest, score, self.em, seed)

    def stage(self, name, kind, trained_on, make_targets, init_from=None, rescorer=None):
        """Train a `kind` model on the targets make_targets() returns, evaluate it and write
        result.json; or, if that file exists, read the finished stage back. Under torchrun every
        process trains and computes its share of the targets; rank 0 alone evaluates and writes."""
        path = os.path.join(self.stage_dir(name), "result.json")
        # rank 0 has written the last stage
        barrier()
        if os.path.isfile(path):
            with open(path) as f:
                self.results.append(json.load(f))
            print(f"[{name}] finished earlier: {path}")
            return LazyModel(self, name)
        print(f"[{name}] training {'an AR' if kind == 'ar' else 'a NAR'} model on {trained_on} ...")
        targets, notes = self.cached(name, "train.tgt",
                                     lambda: self.targets_and_notes(make_targets),
                                     self.write_targets, self.read_targets)
        model, summary = train_stage_model(self, name, new_model(self, kind, init_from), targets)
        result = None
        if is_main():
            result, outputs = evaluate_stage(self, model, kind, targets, rescorer)
            result.update(stage=name, kind=kind, trained_on=trained_on, training=summary, **notes)
            report.write_outputs(self.stage_dir(name), self.test, outputs)
            write_atomic(path, json.dumps(result, indent=2))
            remove_loop_files(self.stage_dir(name))                       # the stage is done
            print(report.format_table([result], self.corpus.toy is not None))
            if self.cfg.report.examples:
                print(report.format_examples(self.test, outputs, self.cfg.report.examples))
        self.results.append(from_main(result))
        return LazyModel(self, name, model)

    def targets_and_notes(self, make_targets):
        """A stage's targets, and notes on how they were chosen (an E-step's: what Q held, printed
        with one source's E-step as an example)."""
        made = make_targets()
        if not isinstance(made, EStep):
            return made, {}
        if is_main() and self.cfg.report.examples:
            q, scores = made.sets[0], made.nar_scores[0]
            print(report.format_e_step_example(self.corpus, 0, scores, made.nbest.candidates(0),
                                               made.nbest.scores[0].tolist(), q, made.targets[0]))
        return made.targets, report.candidate_set_notes(self.corpus, made.sets, made.targets)

    # ----- files of a run: token ids as text, one sentence per line ----------------------------
    def write_ids(self, path, targets):
        """Token id lists as text, one per line (a list, or any iterable of them)."""
        write_atomic(path, "".join(" ".join(self.corpus.vocab.decode(t)) + "\n"
                                        for t in targets))

    def read_ids(self, path):
        with open(path, encoding="utf-8") as f:
            return [self.corpus.vocab.encode(line.split()) for line in f.read().split("\n")[:-1]]

    def write_targets(self, path, value):
        targets, notes = value
        write_atomic(path[:-len(".tgt")] + ".json", json.dumps(notes))
        self.write_ids(path, targets)

    def read_targets(self, path):
        with open(path[:-len(".tgt")] + ".json") as f:
            return self.read_ids(path), json.load(f)

    def write_nbest(self, path, candidates):
        """The N-best as candidates.scores (a score per line), then candidates.tgt (the cache looks
        for it)."""
        write_atomic(path[:-len(".tgt")] + ".scores",
                          "".join(f"{s:.6f}\n" for s in candidates.scores.reshape(-1).tolist()))
        self.write_ids(path, (c for i in range(len(candidates)) for c in candidates.candidates(i)))

    def read_nbest(self, path):
        """The N-best that write_nbest saved, read into compact arrays line by line."""
        tokens, lengths, stoi = array("i"), array("q"), self.corpus.vocab.stoi
        with open(path, encoding="utf-8") as f:
            for line in f:
                ids = [stoi.get(w, UNK) for w in line.split()]
                tokens.extend(ids)
                lengths.append(len(ids))
        scores = np.loadtxt(path[:-len(".tgt")] + ".scores", dtype=np.float32, ndmin=1)
        n = self.em.candidates
        return NBest(n, np.frombuffer(tokens, dtype=np.int32).copy(),
                     np.concatenate([[0], np.cumsum(np.frombuffer(lengths, dtype=np.int64))]),
                     scores.reshape(-1, n))

    def read_distillation_targets(self, path):
        """Precomputed targets for the first NAR model: one line per line of train.SRC (the lines
        em-nat drops, empty or too long, are dropped from both), tokenised as train.TGT: BPE-encoded
        with the run's BPE where em-nat learned one and the file holds plain text."""
        corpus = self.corpus
        if corpus.train_lines is None:
            raise DataError(f"{path}: precomputed distillation targets need a corpus directory "
                            f"(--data-dir)")
        lines = read_lines(path)
        if len(lines) != corpus.train_file_lines:
            raise DataError(f"{path} has {len(lines)} lines but the training sources have "
                            f"{corpus.train_file_lines}: the distillation targets must translate "
                            f"train.{self.cfg.data.src} line by line")
        targets = [lines[i].split() for i in corpus.train_lines]
        if corpus.bpe is not None and not any("@@" in tok for t in targets[:1000] for tok in t):
            targets = [corpus.bpe.encode(t) for t in targets]
        return [corpus.vocab.encode(t) for t in targets]


def load_corpus(cfg, directory, max_len):
    """The embedded task of the run's seed, or the corpus directory (with the BPE the run learned
    first, kept in its directory, so that a resumed run encodes the text as it did)."""
    data = cfg.data
    if data.data_dir is None:
        return make_toy_corpus(seed=cfg.seed, train_size=data.toy_train_size, task=data.task)
    bpe_path = os.path.join(directory, "bpe.codes")
    corpus = load_corpus_dir(data.data_dir, data.src, data.tgt, data.bpe_merges, max_len,
                             bpe=BPE.load(bpe_path) if os.path.isfile(bpe_path) else None,
                             max_train_pairs=data.max_train_pairs)
    if corpus.bpe is not None and not os.path.isfile(bpe_path) and is_main():
        corpus.bpe.save(bpe_path)
    if not corpus.test:
        print(f"{corpus.name}: no test split (test.{data.src}/test.{data.tgt}): every stage is "
              f"evaluated on the validation split, which also chooses nothing but is not held out "
              f"from tuning")
    return corpus


def validation_pairs(corpus, max_len):
    """The validation pairs a training loop's validation loss is measured on (those within
    max_len)."""
    valid_ids = corpus.ids("valid")
    pairs = [(s, t) for s, t in valid_ids if max(len(s), len(t)) <= max_len]
    if not pairs:
        raise DataError(f"{corpus.name}: none of the {len(valid_ids)} validation pairs is within "
                        f"--max-len {max_len} tokens, so no checkpoint could be chosen; "
                        f"raise --max-len")
    return pairs


def decoding_budget(train_cfg):
    """The decoding batches' token budget: --decode-tokens, else the device's default."""
    return train_cfg.decode_tokens or default_decode_tokens(train_cfg.device, train_cfg.max_tokens)


def run_settings(cfg, corpus, max_len):
    """Everything that shapes a run's models and saved targets, as run.json records them. An
    update's size is recorded as batches_per_update (update_freq x processes): 8 processes with
    update_freq 1 train exactly as 1 process with update_freq 8, and may resume each other's
    runs."""
    data = asdict(cfg.data)
    if data["data_dir"] is None:
        data["bpe_merges"] = None
    # how the work is batched, compiled or placed does not shape the models
    train = {k: v for k, v in asdict(cfg.train).items()
             if k not in ("device", "update_freq", "decode_tokens", "compile")}
    train["batches_per_update"] = cfg.train.update_freq * world_size()
    em = {k: v for k, v in asdict(cfg.em).items() if k != "iterations"}
    shown = {k: v for k, v in asdict(cfg.report).items()
             if k not in ("speed_sentences", "examples")}
    return {"format": RUN_FORMAT, "data": corpus.name, "preset": cfg.preset, "seed": cfg.seed,
            "vocab_size": len(corpus.vocab), "train_pairs": len(corpus.train), "max_len": max_len,
            "data_options": data, "train": train, "em": em, "report": shown}


def setting_changes(saved, current):
    """'name: saved -> current' for every setting of `current` that differs from `saved` (sections,
    e.g. "train", compared key by key)."""
    changes = []
    for key, value in current.items():
        if isinstance(value, dict) and isinstance(saved.get(key), dict):
            changes += [f"{key}.{change}" for change in setting_changes(saved[key], value)]
        elif saved.get(key) != value:
            changes.append(f"{key}: {saved.get(key)} -> {value}")
    return changes


def check_run_dir(directory, settings, vocab):
    """A run directory belongs to one data set and one set of settings: resuming it with others
    would mix models trained on different vocabularies or targets. The first call writes
    run.json."""
    path = os.path.join(directory, "run.json")
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if saved.get("format") != RUN_FORMAT:
            raise CheckpointError(f"{path}: written by another version of em-nat (run format "
                                  f"{saved.get('format', 1)}, this one reads {RUN_FORMAT}); "
                                  f"use another --out")
        changed = setting_changes(saved, settings)
        if changed:
            raise CheckpointError(f"{path}: this run directory was made with other settings "
                                  f"({'; '.join(changed)}); use another --out or the original "
                                  f"options")
    elif is_main():
        write_atomic(path, json.dumps(settings, indent=2))
    vocab_path = os.path.join(directory, "vocab.txt")
    if os.path.isfile(vocab_path) and Vocab.load(vocab_path).itos != vocab.itos:
        raise CheckpointError(f"{vocab_path}: differs from the vocabulary of the data; use another "
                              f"--out for this data")
    if is_main():
        vocab.save(vocab_path)


def new_model(run, kind, init_from=None, offset=0):
    """A fresh model. The seed is set right here, from the stage's place in the loop (plus `offset`
    for the extra models of a stage), because building a model draws from the RNG: a resumed
    stage must start from the same weights and dropout stream as an uninterrupted one."""
    torch.manual_seed(run.cfg.seed * 1000 + offset + len(run.results))
    dropout = {} if run.cfg.train.dropout is None else {"dropout": run.cfg.train.dropout}
    model = build_model(model_config(run.cfg.preset, len(run.corpus.vocab), kind,
                                     max_len=run.max_len, **dropout),
                        run.device)
    if init_from is not None and run.em.init == "warm":
        model.load_state_dict(init_from.model().state_dict())
    return model


def train_stage_model(run, name, model, targets):
    """Train `model` on (training source, target) pairs into the stage's directory; the model comes
    back in eval mode."""
    stage = run.stage_dir(name)
    # a stage directory is a usable checkpoint
    for file in ("vocab.txt", "bpe.codes"):
        if os.path.isfile(os.path.join(run.dir, file)) and is_main():
            shutil.copyfile(os.path.join(run.dir, file), os.path.join(stage, file))
    pairs = [(s, t) for s, t in zip(run.train_sources, targets) if 0 < len(t) <= run.max_len]
    if len(pairs) < len(targets):
        print(f"{name}: {len(targets) - len(pairs)} of {len(targets)} targets are empty or longer "
              f"than {run.max_len} tokens and are left out")
    return train_model(model, pairs, run.valid_loss_pairs, run.cfg.train, stage, desc=name,
                       meta={"stage": name, "is_bpe": run.corpus.is_bpe, "alpha": run.em.alpha})


def train_fold_model(run, stage, k, indices, targets):
    """A cross-fitting NAR model: trained on the training pairs `indices` (those outside fold k)
    with `targets`, into <stage>/fold<k>; resumable like a stage."""
    model = new_model(run, "nar", offset=100 * (k + 1))
    pairs = [(run.train_sources[i], targets[i]) for i in indices
             if 0 < len(targets[i]) <= run.max_len]
    directory = os.path.join(run.stage_dir(stage), f"fold{k}")
    model, _ = train_model(model, pairs, run.valid_loss_pairs, run.cfg.train, directory,
                           desc=f"{stage} fold {k}")
    remove_loop_files(directory)
    return model


def write_json(path, value):
    write_atomic(path, json.dumps(value))


def read_json(path):
    with open(path) as f:
        return json.load(f)


def evaluate_stage(run, model, kind, targets, rescorer):
    """A stage's results: its model on the test split (report.evaluate_*) and the multi-modality of
    its training targets. Returns (results, the test outputs of each decoder)."""
    shown = run.cfg.report
    if kind == "ar":
        result, outputs = report.evaluate_ar(model, run.test, shown.beam, run.em.alpha)
    else:
        result, outputs = report.evaluate_nar(model, rescorer.model(), run.test, shown.beam,
                                              run.em.alpha, shown.length_beam,
                                              shown.speed_sentences)
    sample = report.entropy_sample(list(zip(run.train_sources, targets)), shown.entropy_pairs)
    result.update(split=run.test.split, targets_entropy=report.alignment_entropy(sample),
                  targets_entropy_pairs=len(sample), targets_nll=None)
    if kind == "nar":
        result["targets_nll"] = report.targets_nll(model, run.train_sources, targets, run.max_len,
                                                   run.decode_tokens, run.device)
    if run.corpus.toy is not None:
        result.update(report.target_modes(run.corpus, targets))
    return result, outputs


def print_results(run, results):
    shown, tables = report.format_results(results, run.test)
    print(shown)
    write_atomic(os.path.join(run.dir, "results.json"), json.dumps(results, indent=2))
    write_atomic(os.path.join(run.dir, "results.txt"), tables + "\n")
    print(f"saved {os.path.join(run.dir, 'results.json')}")


def run_pipeline(cfg: RunConfig):
    """Run (or resume) the whole pipeline of one configuration and print its tables. Raises
    DataError / CheckpointError / TrainingError with a one-line message; main reports them."""
    run = Run(cfg)
    print(f"em-nat: {run.corpus.name}, {len(run.train_ids)} training pairs, "
          f"vocabulary {len(run.corpus.vocab)}, preset {cfg.preset}, device {run.device} "
          f"({run.precision}), {world_size()} process(es), {torch.get_num_threads()} threads, "
          f"run directory {run.dir}")
    results = em_loop(run)
    if is_main():
        print_results(run, results)
    return results


# ------------------------------------------------------------------------------------------------
# Studies over runs: the quality margin, seeds and controls
# ------------------------------------------------------------------------------------------------
# 0: Q = the AR top-1 alone, i.e. plain distillation; "Cx": scaled by the AR top-1's confidence
MARGINS = (None, 3.0, 2.0, 1.0, 0.5, 0.0, "2x", "1x", "0.5x")


def margin_study(cfg: RunConfig, margins=MARGINS):
    """How the quality margin shapes the first E-step, measured on a finished run (AR_0 in ar/, its
    saved N-best of the training sources in em1-ar/, NAR_0 in nar-kd/), training nothing: for each
    margin, Q's mean size, the share of selections that are the AR top-1, and the selected targets'
    quality: on the embedded task exactly (invalid share, mode entropy, Q valid%), on real data
    their sentence BLEU against the reference. The same for held-out sources (the test split), which
    NAR_0 never trained on: where NAR_0 re-picks the AR top-1 far more often on its own training
    sources, it remembers its training targets rather than judging the candidates. Prints a table;
    returns its rows."""
    run = Run(cfg)
    saved = os.path.join(run.stage_dir("em1-ar"), "candidates.tgt")
    if not os.path.isfile(saved):
        raise CheckpointError(f"{run.stage_dir('em1-ar')}: no saved N-best; run the pipeline "
                              f"into {cfg.out} first")
    nar_model, rows = LazyModel(run, "nar-kd").model(), []
    for split in ("train", run.test.split):
        if split == "train":
            sources, (candidates, ar_scores) = run.train_sources, run.read_nbest(saved).lists()
        else:
            sources = run.test.sources
            candidates, ar_scores = ar_nbest(run, LazyModel(run, "ar").model(), sources).lists()
        rows += margin_rows(run, nar_model, split, sources, candidates, ar_scores, margins)
    print(report.format_margin_table(rows, toy=run.corpus.toy is not None))
    return rows


def margin_rows(run, nar_model, split, sources, candidates, ar_scores, margins):
    """The margin study's rows for one set of sources: the candidates scored once by the NAR model,
    then for each margin, Q and the E-step's selection in it (the E-step's own functions)."""
    scores = candidate_nar_scores(run, nar_model, sources, candidates)
    refs = [ids_to_text(t, run.corpus.vocab, run.corpus.is_bpe) for _, t in run.corpus.ids(split)]
    rows = []
    for margin in margins:
        # Q, as indices
        keep = [quality_constrained_set(range(len(s)), s, margin) for s in ar_scores]
        sets = [[candidates[i][j] for j in js] for i, js in enumerate(keep)]
        targets, _ = best_candidates(sets, [[scores[i][j] for j in js]
                                            for i, js in enumerate(keep)])
        row = {"sources": split, "margin": margin,
               **report.candidate_set_notes(run.corpus, sets, targets, split)}
        if run.corpus.toy is not None:
            row.update(report.target_modes(run.corpus, targets, split))
        else:
            hyps = [ids_to_text(t, run.corpus.vocab, run.corpus.is_bpe) for t in targets]
            row["sentence_bleu"] = sum(map(sentence_bleu, hyps, refs)) / max(len(refs), 1)
        rows.append(row)
    return rows


def copy_shared_stages(source_dir, target_dir, stages=("ar", "nar-raw", "nar-kd")):
    """A control run differs from the paper's run only in its EM stages: start it with copies of the
    finished stages before them."""
    for name in stages:
        src, dst = os.path.join(source_dir, name), os.path.join(target_dir, name)
        if (os.path.isfile(os.path.join(src, "result.json")) and not os.path.exists(dst)
                and is_main()):
            shutil.copytree(src, dst)


def run_seeds(cfg: RunConfig, seeds, selections):
    """The pipeline once per seed (and per E-step selection: the paper's and the controls), each in
    <out>/seed<N>[-<selection>]; then one table of every stage's mean, min and max over the
    seeds."""
    by_stage = {}
    for seed in seeds:
        base = os.path.join(cfg.out, f"seed{seed}")
        for selection in selections:
            out = base if selection == "nar" else f"{base}-{selection}"
            os.makedirs(out, exist_ok=True)
            copy_shared_stages(base, out)
            run_cfg = replace(cfg, out=out, seed=seed, train=replace(cfg.train, seed=seed),
                              em=replace(cfg.em, selection=selection))
            for result in run_pipeline(run_cfg):
                by_stage.setdefault((selection, result["stage"]), []).append(result)
    summary = report.format_seed_summary(by_stage, toy=cfg.data.data_dir is None, seeds=seeds)
    print("\n" + summary)
    if is_main():
        write_atomic(os.path.join(cfg.out, "seeds.txt"), summary + "\n")
        write_atomic(os.path.join(cfg.out, "seeds.json"), json.dumps(
            {f"{sel}/{stage}": results for (sel, stage), results in by_stage.items()}, indent=2))
        print(f"saved {os.path.join(cfg.out, 'seeds.txt')}")
    return by_stage


def benchmark(cfg: RunConfig, steps, sentences):
    """Training and N-best throughput on the corpus of --data-dir, or on the embedded task
    (report.benchmark)."""
    if cfg.data.data_dir is None:
        corpus = make_toy_corpus(seed=cfg.seed, train_size=cfg.data.toy_train_size,
                                 task=cfg.data.task)
    else:
        corpus = load_corpus_dir(cfg.data.data_dir, cfg.data.src, cfg.data.tgt,
                                 cfg.data.bpe_merges, model_config(cfg.preset, 0, "ar").max_len,
                                 log=lambda *a: None)
    decode_tokens = decoding_budget(cfg.train)
    print(f"benchmark: {corpus.name}, {len(corpus.train)} training pairs, "
          f"vocabulary {len(corpus.vocab)}, preset {cfg.preset}, {cfg.train.max_tokens}-token "
          f"batches, {decode_tokens}-token decoding batches, device {cfg.train.device} "
          f"({cfg.train.precision}), {torch.get_num_threads()} threads, torch {torch.__version__}"
          f"{', compiled' if cfg.train.compile else ''}")
    return report.benchmark(corpus, cfg.preset, cfg.train, steps, sentences, cfg.em.candidates,
                            decode_tokens)


# ------------------------------------------------------------------------------------------------
# The command line: `python train.py` (or `python em_nat.py`)
# ------------------------------------------------------------------------------------------------
def preset_help():
    """The presets' sizes and schedules, for --help."""
    lines = []
    for name in PRESETS:
        m, t = PRESETS[name], TRAIN_PRESETS[name]
        lines.append(f"  {name:<6} d_model {m['d_model']}, {m['enc_layers']}+{m['dec_layers']} "
                     f"layers, dropout {m['dropout']}; {t['ar_steps']} AR / {t['nar_steps']} NAR "
                     f"steps of {t['max_tokens']} tokens, lr {t['lr']}")
    return "\n".join(lines)


EXAMPLES = """presets (model size; steps per stage: a run trains 3 + 2 x --em-iterations models):
{presets}

examples:
  python train.py                                        # the embedded task: ~10 min, laptop CPU
  python train.py --seed 2 --out runs/seed2              # another seed of the same
  python train.py --data-dir DIR --preset iwslt          # IWSLT14 De-En on a GPU (fairseq layout)
  torchrun --nproc_per_node 8 train.py --data-dir DIR --preset base   # several GPUs
  python train.py --seeds 1 2 3 --controls               # over seeds, with the E-step's controls
"""

# --help's groups, in order, and the configurations whose options each shows (an option may name
# another group)
HELP_GROUPS = (("data", DataConfig),
               ("model and training", TrainConfig),
               ("EM loop and evaluation", EMConfig, ReportConfig),
               ("run", RunConfig),
               ("studies and diagnostics (a first run needs none of these)", Studies))


def build_parser():
    p = argparse.ArgumentParser(
        prog="train.py",
        description="Run the whole EM pipeline of Sun & Yang (2020): an AR model, a NAR model "
                    "on the raw\n"
                    "data, a NAR model after knowledge distillation, then EM iterations; prints "
                    "one table of\n"
                    "results per stage. With no arguments it runs on the embedded toy task in "
                    "about 10\n"
                    "minutes on a laptop CPU. Running the same command again resumes where it "
                    "stopped.",
        epilog=EXAMPLES.format(presets=preset_help()), formatter_class=HelpFormatter)
    add_options(p, HELP_GROUPS, RunConfig, Studies)
    return p


def run_config(args):
    """The command line as a RunConfig: every option checked here (a ValueError of one line naming
    the option), and the defaults that depend on other options decided (the preset's, the best
    device)."""
    check_minimums(args, RunConfig)
    if args.selection == "nar-crossfit" and args.crossfit_folds < 2:
        raise ValueError("--selection nar-crossfit needs --crossfit-folds of 2 or more")
    preset = args.preset or ("toy" if args.data_dir is None else "iwslt")
    data_name = ("toy" if args.data_dir is None
                 else os.path.basename(os.path.normpath(args.data_dir)))
    # the paper: 1.4 on IWSLT14
    alpha = args.alpha if args.alpha is not None else (1.4 if preset == "iwslt" else 1.0)
    return RunConfig(**values(RunConfig, args, preset=preset,
                              out=args.out or os.path.join("runs", f"{data_name}-{preset}")),
                     data=DataConfig(**values(DataConfig, args)),
                     train=train_config(args, preset),
                     em=EMConfig(**values(EMConfig, args, alpha=alpha)),
                     report=ReportConfig(**values(ReportConfig, args)))


def train_config(args, preset):
    """The TrainConfig of a preset, with the command line's overrides: on this process's device,
    which must be one this machine has."""
    device = process_device(check_device(args.device))
    chosen = values(TrainConfig, args, seed=args.seed, device=device,
                    precision=resolve_precision(args.precision, device))
    return TrainConfig(**{**TRAIN_PRESETS[preset],
                          **{name: value for name, value in chosen.items() if value is not None}})


def main(argv=None):
    """The command line: a bad option ends with one line and exit status 2; every expected failure
    after that (bad data, a checkpoint of another run, a diverging loss, Ctrl-C) with one line on
    stderr and exit status 1, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory_on_cpu()
    try:
        # under torchrun, the processes meet first: each then takes the GPU of its local rank
        start_processes(check_device(args.device))
        cfg = run_config(args)
    except ValueError as err:
        parser.error(str(err))
    study = Studies(**values(Studies, args))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not is_main():
        sys.stdout = open(os.devnull, "w")                    # one log: rank 0's
    try:
        if study.benchmark:
            benchmark(cfg, study.benchmark_steps, study.benchmark_sentences)
        elif study.margin_study:
            margin_study(cfg)
        elif study.seeds:
            run_seeds(cfg, study.seeds,
                      [cfg.em.selection] + (list(CONTROLS) if study.controls else []))
        else:
            run_pipeline(cfg)
    except (DataError, CheckpointError, TrainingError) as err:
        sys.exit(f"error: {err}")
    except Stopped as stop:
        sys.exit(str(stop))
    finally:
        stop_processes()


if __name__ == "__main__":
    main()
