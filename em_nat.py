"""em_nat.py: the EM loop of Sun & Yang (2020) as a chain of resumable stages (PAPER.md Sec. 2-3).

    stage      trains                 on the targets
    ar         AR_0                   the real training data
    nar-raw    NAR (baseline)         the real training data: suffers from multi-modality
    nar-kd     NAR_0                  AR_0's beam outputs (sequence-level KD: the first M-step)
    em{i}-ar   AR_i  (E-step)         the candidates that NAR_{i-1} likes best among AR_{i-1}'s N-best
    em{i}-nar  NAR_i (M-step)         AR_i's beam outputs

E-step: q(Y) = argmin_{q in Q} KL(q || p_NAR(Y|X)): within the quality-constrained set (the AR model's
N-best candidates, good translations by construction) take the targets the NAR model likes best, and
let a new AR model learn them, so that it approximates that regularised posterior. M-step: train the
NAR model on the posterior, realised as the new AR model's outputs. Each iteration cannot make the NAR
objective worse, and the targets get simpler (less multi-modal) as it goes.

Every stage writes its directory (model.pt, config.json, vocab.txt, the targets it trained on,
result.json last), so a re-run with the same --out continues after the last finished stage.
`python train.py --help` lists the options; this module holds the steps, train.py the loop.
"""
import json
import os
import shutil
import sys
import time

import torch

import decode
from data import BPE, DataError, Vocab, load_corpus_dir, make_toy_corpus, write_text_atomic
from decode import bleu, ids_to_text, translate_ids
from model import CheckpointError, autocast_for, build_model, load_checkpoint, model_config, synchronize
from train import TrainingError, train_config, train_model

SHARED_IWSLT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "data", "iwslt14.de-en")


# ------------------------------------------------------------------------------------------------
# The EM steps (PAPER.md Sec. 3)
# ------------------------------------------------------------------------------------------------
def distil(ar_model, sources, run):
    """Sequence-level knowledge distillation (Sec. 3, steps 1 and 5): the AR model's beam-search
    translation of every training source becomes that source's NAR training target."""
    return translate_ids(ar_model, sources, method="beam", beam=run.args.kd_beam, alpha=run.args.alpha,
                         max_tokens=run.decode_tokens, device=run.device, progress=True)


def nbest_candidates(ar_model, sources, run):
    """E-step, the quality constraint Q (Sec. 3 step 2): the AR model's N-best beam-search
    candidates for every training source (N = --candidates, 20 in the official code)."""
    return decode.nbest_ids(ar_model, sources, run.args.candidates, alpha=run.args.alpha,
                            max_tokens=run.decode_tokens, device=run.device, progress=True)


@torch.no_grad()
def nar_scores(nar_model, pairs, run):
    """Sentence log-likelihoods log p_NAR(y|x) (Transformer.score) of (source, target) id pairs,
    batched by the token budget; a list in the order of `pairs`."""
    scores = [0.0] * len(pairs)
    with autocast_for(run.device):
        for batch in decode.make_batches([max(len(s), len(t)) for s, t in pairs], run.decode_tokens):
            src = decode.pad_batch([pairs[j][0] for j in batch], run.device)
            tgt = decode.pad_batch([pairs[j][1] for j in batch], run.device)
            for j, score in zip(batch, nar_model.score(src, tgt).tolist()):
                scores[j] = score
    return scores


@torch.no_grad()
def select_by_nar_likelihood(nar_model, sources, candidates, run):
    """E-step, the selection (Sec. 3 steps 3-4, official score_nat.py + data_selection.py): score every
    (source, candidate) pair by the full NAR log-likelihood log p(T|x) + sum_t log p(y_t|x,T) (no token
    masked, NOT length-normalised, as the official code does; output layer in float32) and keep the
    best candidate of each source (ties: the first). Returns (selected targets, their NAR scores)."""
    flat = [(i, cand) for i, cands in enumerate(candidates) for cand in cands
            if 0 < len(cand) <= nar_model.cfg.max_len]                # the NAR model cannot emit length 0
    scores = nar_scores(nar_model, [(sources[i], cand) for i, cand in flat], run)
    best = [(float("-inf"), None)] * len(sources)
    for (i, cand), score in zip(flat, scores):
        if score > best[i][0]:
            best[i] = (score, cand)
    selected = [cand if cand is not None else candidates[i][0] for i, (_, cand) in enumerate(best)]
    return selected, [score for score, _ in best]


# ------------------------------------------------------------------------------------------------
# Multi-modality of a corpus: conditional entropy of aligned words (after Zhou et al. 2020)
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def alignment_entropy(pairs, iterations=5, batch_size=2000):
    """Corpus-level multi-modality (PAPER.md Sec. 6): fit IBM Model 1 word translation probabilities
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
    return -sum(nar_scores(nar_model, pairs, run)) / max(sum(len(t) for _, t in pairs), 1)


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
    outs = translate_ids(ar_model, run.eval_sources, method="beam", beam=run.args.beam, alpha=run.args.alpha,
                         max_tokens=run.decode_tokens, device=run.device)
    return {**quality(run, outs), "repeats": repeat_rate(outs)}


def evaluate_nar(run, nar_model, ar_model):
    """NAR BLEU with plain argmax, with ODD, and with ODD + AR rescoring of a length beam (NPD); and the
    speed-up of NAR ODD over AR beam search at batch size 1, timed side by side."""
    common = dict(method="nar", max_tokens=run.decode_tokens, device=run.device)
    argmax = translate_ids(nar_model, run.eval_sources, odd=False, **common)
    odd = translate_ids(nar_model, run.eval_sources, odd=True, **common)
    rescored = translate_ids(nar_model, run.eval_sources, odd=True, length_beam=run.args.length_beam,
                             rescorer=ar_model, alpha=run.args.alpha, **common)
    timed = run.eval_sources[:run.args.speed_sentences]
    with torch.no_grad(), autocast_for(run.device):
        ar_ms = time_per_sentence(lambda s: decode.ar_beam_search(ar_model, s, beam=run.args.beam,
                                                                  alpha=run.args.alpha), timed, run.device)
        nar_ms = time_per_sentence(lambda s: decode.nar_decode(nar_model, s), timed, run.device)
    result = {**quality(run, odd), "repeats": repeat_rate(argmax), "ar_beam_ms": ar_ms, "nar_ms": nar_ms,
              "speedup": ar_ms / nar_ms}
    result["argmax"] = quality(run, argmax)
    result["rescored"] = quality(run, rescored)
    return result


# ------------------------------------------------------------------------------------------------
# A run: its directory, its data, its stages
# ------------------------------------------------------------------------------------------------
class Run:
    def __init__(self, args):
        self.args = args
        self.preset = args.preset or ("toy" if args.data_dir is None else "iwslt")
        if args.alpha is None:
            args.alpha = 1.4 if self.preset == "iwslt" else 1.0      # PAPER.md Sec. 4: alpha 1.4 on IWSLT14
        self.cfg = train_config(args, self.preset)
        self.device = self.cfg.device
        default_name = "toy" if args.data_dir is None else os.path.basename(os.path.normpath(args.data_dir))
        self.dir = args.out or os.path.join("runs", f"{default_name}-{self.preset}")
        os.makedirs(self.dir, exist_ok=True)
        self.max_len = args.max_len or model_config(self.preset, 0, "ar").max_len
        self.decode_tokens = self.cfg.max_tokens * 4
        self.corpus = self.load_corpus()
        self.check_run_dir()
        self.train_ids = self.corpus.ids("train")
        self.train_sources = [s for s, _ in self.train_ids]
        # The validation split chooses checkpoints (its loss needs pairs the model can hold); every stage
        # is evaluated on the test split, as the paper reports, or on validation where no test split exists.
        valid_ids = self.corpus.ids("valid")
        self.valid_loss_pairs = [(s, t) for s, t in valid_ids if max(len(s), len(t)) <= self.max_len]
        if not self.valid_loss_pairs:
            raise DataError(f"{self.corpus.name}: none of the {len(valid_ids)} validation pairs is within "
                            f"--max-len {self.max_len} tokens, so no checkpoint could be chosen; raise --max-len")
        self.eval_split = "test" if self.corpus.test else "valid"
        self.eval_sources = [s[:self.max_len] for s, _ in self.corpus.ids(self.eval_split)]

    def load_corpus(self):
        args = self.args
        if args.data_dir is None:
            return make_toy_corpus(seed=args.seed, train_size=args.toy_train_size)
        bpe_path = os.path.join(self.dir, "bpe.codes")
        corpus = load_corpus_dir(args.data_dir, args.src, args.tgt, args.bpe_merges, self.max_len,
                                 bpe=BPE.load(bpe_path) if os.path.isfile(bpe_path) else None,
                                 max_train_pairs=args.max_train_pairs)
        if corpus.bpe is not None and not os.path.isfile(bpe_path):
            corpus.bpe.save(bpe_path)
        return corpus

    def check_run_dir(self):
        """A run directory belongs to one data set and one set of settings: resuming it with others
        would mix models trained on different vocabularies."""
        settings = {"data": self.corpus.name, "preset": self.preset, "seed": self.args.seed,
                    "vocab_size": len(self.corpus.vocab), "train_pairs": len(self.corpus.train),
                    "candidates": self.args.candidates, "em_init": self.args.em_init, "alpha": self.args.alpha,
                    "kd_beam": self.args.kd_beam, "beam": self.args.beam, "length_beam": self.args.length_beam,
                    "bpe_merges": self.args.bpe_merges if self.args.data_dir else None,
                    "max_len": self.max_len, "train": {k: v for k, v in vars(self.cfg).items() if k != "device"}}
        path = os.path.join(self.dir, "run.json")
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            changed = [k for k in settings if saved.get(k) != settings[k]]
            if changed:
                raise CheckpointError(f"{path}: this run directory was made with other settings "
                                      f"({', '.join(f'{k}: {saved.get(k)} -> {settings[k]}' for k in changed)}); "
                                      f"use another --out or the original options")
        else:
            write_text_atomic(path, json.dumps(settings, indent=2))
        vocab_path = os.path.join(self.dir, "vocab.txt")
        if os.path.isfile(vocab_path) and Vocab.load(vocab_path).itos != self.corpus.vocab.itos:
            raise CheckpointError(f"{vocab_path}: differs from the vocabulary of the data; "
                                  f"use another --out for this data")
        self.corpus.vocab.save(vocab_path)

    def stage_dir(self, name):
        return os.path.join(self.dir, name)

    def new_model(self, name, kind, init_from=None):
        """A fresh model for stage `name`. The seed is set right here, because building a model draws
        from the RNG: a resumed stage (which reads its targets from disk instead of loading the AR model
        that made them) must start from the same weights and dropout stream as an uninterrupted one."""
        torch.manual_seed(self.args.seed * 1000 + stage_list(self.args.em_iterations).index(name))
        model = build_model(model_config(self.preset, len(self.corpus.vocab), kind, max_len=self.max_len),
                            self.device)
        if init_from is not None and self.args.em_init == "warm":
            model.load_state_dict(load_checkpoint(self.stage_dir(init_from), self.device)[0].state_dict())
        return model

    def load(self, name):
        return load_checkpoint(self.stage_dir(name), self.device)[0]

    def save_targets(self, name, filename, targets):
        write_text_atomic(os.path.join(self.stage_dir(name), filename),
                          "".join(" ".join(self.corpus.vocab.decode(t)) + "\n" for t in targets))

    def load_targets(self, name, filename):
        path = os.path.join(self.stage_dir(name), filename)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            return [self.corpus.vocab.encode(line.split()) for line in f.read().split("\n")[:-1]]

    def train(self, name, model, targets):
        """Train `model` on (training source, target) pairs into the stage's directory."""
        stage = self.stage_dir(name)
        os.makedirs(stage, exist_ok=True)
        for file in ("vocab.txt", "bpe.codes"):
            if os.path.isfile(os.path.join(self.dir, file)):
                shutil.copyfile(os.path.join(self.dir, file), os.path.join(stage, file))
        pairs = [(s, t) for s, t in zip(self.train_sources, targets) if 0 < len(t) <= self.max_len]
        if len(pairs) < len(targets):
            print(f"{name}: {len(targets) - len(pairs)} of {len(targets)} targets are empty or longer than "
                  f"{self.max_len} tokens and are left out")
        model, summary = train_model(model, pairs, self.valid_loss_pairs, self.cfg, stage, desc=name,
                                     meta={"stage": name, "is_bpe": self.corpus.is_bpe, "alpha": self.args.alpha})
        return model, summary

    def targets_or(self, name, filename, compute):
        """The stage's training targets: computed once, saved, and read back when resuming."""
        os.makedirs(self.stage_dir(name), exist_ok=True)
        targets = self.load_targets(name, filename)
        if targets is None:
            targets = compute()
            self.save_targets(name, filename, targets)
        return targets


def stage_list(iterations):
    return ["ar", "nar-raw", "nar-kd"] + [f"em{i}-{k}" for i in range(1, iterations + 1) for k in ("ar", "nar")]


def previous(name):
    """The models an EM stage starts from: (AR_{i-1}, NAR_{i-1}) stage names."""
    i = int(name[2:name.index("-")])
    return ("ar", "nar-kd") if i == 1 else (f"em{i - 1}-ar", f"em{i - 1}-nar")


def run_stage(run, name):
    """Train and evaluate one stage; returns its result dict (also written to result.json)."""
    raw_targets = [t for _, t in run.train_ids]
    if name == "ar":
        targets, trained_on = raw_targets, "real data"
        model, summary = run.train(name, run.new_model(name, "ar"), targets)
        result = evaluate_ar(run, model)
    elif name in ("nar-raw", "nar-kd"):
        if name == "nar-raw":
            targets, trained_on = raw_targets, "real data"
        else:
            targets = run.targets_or(name, "train.tgt", lambda: distil(run.load("ar"), run.train_sources, run))
            trained_on = "AR beam outputs (KD)"
        model, summary = run.train(name, run.new_model(name, "nar"), targets)
        result = evaluate_nar(run, model, run.load("ar"))
    elif name.endswith("-ar"):                                            # E-step
        prev_ar, prev_nar = previous(name)

        def select():
            candidates = run.targets_or(name, "candidates.tgt",
                                        lambda: [c for cs in nbest_candidates(run.load(prev_ar), run.train_sources, run)
                                                 for c in cs])
            n = run.args.candidates
            grouped = [candidates[i * n:(i + 1) * n] for i in range(len(run.train_sources))]
            return select_by_nar_likelihood(run.load(prev_nar), run.train_sources, grouped, run)[0]

        targets = run.targets_or(name, "train.tgt", select)
        trained_on = f"{prev_ar} N-best selected by {prev_nar}"
        model, summary = run.train(name, run.new_model(name, "ar", init_from=prev_ar), targets)
        result = evaluate_ar(run, model)
    else:                                                                 # M-step
        ar_name = name.replace("-nar", "-ar")
        targets = run.targets_or(name, "train.tgt", lambda: distil(run.load(ar_name), run.train_sources, run))
        trained_on = f"{ar_name} beam outputs"
        model, summary = run.train(name, run.new_model(name, "nar", init_from=previous(name)[1]), targets)
        result = evaluate_nar(run, model, run.load(ar_name))
    result.update(stage=name, kind=model.cfg.kind, trained_on=trained_on, training=summary, split=run.eval_split,
                  targets_entropy=alignment_entropy(list(zip(run.train_sources, targets))),
                  targets_nll=targets_nll(run, model, targets) if model.cfg.kind == "nar" else None)
    return result


def run_pipeline(run):
    """All stages in order; a finished stage (its result.json exists) is read back, not redone."""
    results = []
    for index, name in enumerate(stage_list(run.args.em_iterations)):
        path = os.path.join(run.stage_dir(name), "result.json")
        if os.path.isfile(path):
            with open(path) as f:
                results.append(json.load(f))
            print(f"[{name}] finished earlier: {path}")
            continue
        print(f"[{name}] {'training' if index else 'training the first AR model'} ...")
        result = run_stage(run, name)
        resume = os.path.join(run.stage_dir(name), "resume.pt")
        write_text_atomic(path, json.dumps(result, indent=2))
        if os.path.isfile(resume):
            os.remove(resume)                                             # the stage is done
        results.append(result)
        print(format_table([result], run.corpus.toy is not None))
    return results


def cell(value, width, digits=2, suffix=""):
    """A right-aligned table cell; blank where a column does not apply (None)."""
    return f"{'':>{width}}" if value is None else f"{value:>{width - len(suffix)}.{digits}f}{suffix}"


def format_table(results, toy):
    """One row per stage: multi-modality of the training targets, quality, decoding speed-up."""
    header = (f"{'stage':<10} {'trained on':<36} {'H(y|x)':>7} {'NLL':>6} {'BLEU':>6} {'argmax':>7} {'+resc':>6} "
              + (f"{'valid%':>7} " if toy else f"{'detok':>6} ") + f"{'rep%':>5} {'speed-up':>8}")
    lines = [header, "-" * len(header)]
    for r in results:
        nar = r["kind"] == "nar"
        row = [f"{r['stage']:<10}", f"{r['trained_on'][:36]:<36}", cell(r["targets_entropy"], 7, 3),
               cell(r["targets_nll"], 6, 3), cell(r["bleu"], 6), cell(r["argmax"]["bleu"] if nar else None, 7),
               cell(r["rescored"]["bleu"] if nar else None, 6),
               cell(r["valid_rate"], 7, 1) if toy else cell(r["detok_bleu"], 6), cell(r["repeats"], 5, 1),
               cell(r["speedup"] if nar else None, 8, 1, "x")]
        lines.append(" ".join(row))
    return "\n".join(lines)


TABLE_NOTES = """columns: H(y|x) = lexical multi-modality of the stage's training targets (IBM-1 alignment entropy,
bits); NLL = the NAR model's -log p(y|x) per token of its own training targets (the EM objective); BLEU = AR beam search / NAR ODD decoding on the {split} split{bleu_kind}; argmax = NAR plain argmax;
+resc = NAR ODD over a length beam rescored by the AR model (NPD);{valid} rep% = repeated adjacent tokens
(AR beam / NAR argmax outputs); speed-up = NAR ODD vs AR beam search, batch size 1, timed side by side."""


def main(args):
    try:
        run = Run(args)
        print(f"em-nat: {run.corpus.name}, {len(run.train_ids)} training pairs, vocabulary {len(run.corpus.vocab)}, "
              f"preset {run.preset}, device {run.device}, run directory {run.dir}")
        results = run_pipeline(run)
    except (DataError, CheckpointError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    toy = run.corpus.toy is not None
    table = format_table(results, toy)
    print(f"\nevaluated on the {run.eval_split} split ({len(run.eval_sources)} sentences)\n" + table)
    print(TABLE_NOTES.format(
        bleu_kind=" (multi-reference: all 6 valid translations)" if toy else " (tokenised, BPE removed)",
        valid=" valid% = exact valid translations;" if toy else
        " detok = sacreBLEU on em-nat's detokenised output against the detokenised references (not raw\n"
        "references: comparable within this table, not with published sacreBLEU scores);",
        split=run.eval_split))
    if not toy:
        print(f"detok signature: {results[0]['signature']}")
    write_text_atomic(os.path.join(run.dir, "results.json"), json.dumps(results, indent=2))
    write_text_atomic(os.path.join(run.dir, "results.txt"), table + "\n")
    print(f"saved {os.path.join(run.dir, 'results.json')}")
    return 0
