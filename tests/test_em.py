"""em_nat.py: selection by NAR likelihood, the multi-modality measure, and the whole pipeline on a
tiny setting (artefacts, selections among the candidates, resume = uninterrupted run)."""
import argparse
import json
import math
import os
import random
import shutil
import types

import pytest
import torch

import em_nat
import report
import train
from decode import NBest, nbest_ids
from model import UNK, ModelConfig, Transformer

torch.set_num_threads(2)


def nar_choice(run, nar, sources, sets):
    """The E-step's selection by the NAR model (exercise 7): in each set, the candidate of highest
    NAR likelihood; (the selected targets, their scores)."""
    return em_nat.best_candidates(sets, em_nat.candidate_nar_scores(run, nar, sources, sets))


@pytest.mark.exercise(7)
def test_selection_keeps_the_candidate_with_the_highest_nar_score():
    torch.manual_seed(0)
    nar = Transformer(ModelConfig(vocab_size=12, kind="nar", d_model=32, n_heads=4, d_ff=64,
                                  enc_layers=1, dec_layers=1, dropout=0.0, max_len=10)).eval()
    # a length classifier of its own (not exercise 1's)
    nar.length_logits = lambda enc: 3 * enc[:, 0, :11]
    without_exercise_2(nar)
    rng = random.Random(0)
    sources = [[rng.randint(4, 11) for _ in range(rng.randint(2, 6))] for _ in range(7)]
    candidates = [[[rng.randint(4, 11) for _ in range(rng.randint(1, 7))] for _ in range(5)]
                  for _ in sources]
    candidates[0][2] = []                                     # an empty AR output is never chosen
    candidates[1][0] = [rng.randint(4, 11) for _ in range(10)]   # max_len tokens: scored
    candidates[2][1] = [5, UNK, 7]                             # <unk> too has its probability
    run = types.SimpleNamespace(decode_tokens=64, device="cpu", precision="fp32")   # padded batches
    selected, scores = nar_choice(run, nar, sources, candidates)
    all_scores = em_nat.candidate_nar_scores(run, nar, sources, candidates)
    for src, cands, chosen, score, row in zip(sources, candidates, selected, scores, all_scores):
        direct = [by_hand_nar_score(nar, src, c) for c in cands]
        assert row == pytest.approx(direct, abs=1e-4)
        assert chosen == cands[max(range(len(cands)), key=direct.__getitem__)]
        assert abs(score - max(direct)) < 1e-4


class TableNAR:
    """A stand-in NAR model for the E-step with known scores: log p(T|x) = bonus[T] and
    log p(y_t|x, T) = w[x_0, y_t] (log-probability tables), so score(x, y) = bonus[|y|] + sum_t
    w[x_0, y_t]. It answers both ways a selection may compute the score: score(src, tgt), as
    Transformer.score, or by hand from encode / length_logits / nar_logits (its logits are already
    log-probabilities)."""

    def __init__(self, seed):
        g = torch.Generator().manual_seed(seed)
        raw = torch.randint(-32, 32, (12, 12), generator=g) / 8
        # tokens 5 and 7 equally likely: exact ties exist
        raw[:, 7] = raw[:, 5]
        self.w = raw.log_softmax(-1)
        self.bonus = (torch.randint(-32, 32, (11,), generator=g) / 8).log_softmax(-1)
        self.cfg = types.SimpleNamespace(max_len=10, kind="nar")

    def eval(self):
        return self

    def score(self, src, tgt):
        real = tgt != 0                                                     # PAD = 0
        tok = self.w[src[:, :1], tgt].masked_fill(~real, 0.0).sum(1)
        return tok + self.bonus[real.sum(1)]

    def encode(self, src):                           # "encoder states": the source itself
        return src, src != 0

    def length_logits(self, enc):                    # (batch, max_len + 1)
        return self.bonus.expand(enc.size(0), -1)

    def nar_logits(self, lengths, enc, enc_keep, max_tgt_len=None):   # (batch, t, vocab)
        t = int(lengths.max()) if max_tgt_len is None else max_tgt_len
        return self.w[enc[:, 0]][:, None, :].expand(-1, t, -1)

    def direct(self, src, cand):
        return float(sum(self.w[src[0], y]
                         for y in cand) + self.bonus[len(cand)]) if cand else float("-inf")


@pytest.mark.exercise(7)
@pytest.mark.parametrize("seed", range(3))
def test_selection_by_a_stand_in_nar_model(seed):
    nar, rng = TableNAR(seed), random.Random(seed)
    sources = [[rng.randint(4, 11) for _ in range(rng.randint(1, 6))] for _ in range(9)]
    sets = [[[rng.randint(4, 11) for _ in range(rng.randint(1, 7))]
             for _ in range(rng.randint(1, 5))]
            for _ in sources]
    # an empty AR output can never be chosen
    sets[0][-1] = []
    sets[1] = [[]]                                           # ... unless it is all there is
    # an exact tie: the first; too long
    sets[2] = [[6, 5, 8], [6, 7, 8], [6, 5, 8, 9, 9, 9, 9, 9, 9, 9, 9]]
    # longer than max_len: cannot be scored, kept
    sets[3] = [[4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4]]
    sets[4] = [[5] * 11, [5] * 10]                           # too long; max_len tokens: scored
    sets[5] = [[], [4] * 11]                                 # nothing can be scored: the first
    # several batches
    run = types.SimpleNamespace(decode_tokens=24, device="cpu", precision="fp32")
    selected, scores = nar_choice(run, nar, sources, sets)
    assert selected[2] == [6, 5, 8] and selected[1] == [] and selected[3] == sets[3][0]
    assert selected[4] == sets[4][1] and selected[5] == []
    all_scores = em_nat.candidate_nar_scores(run, nar, sources, sets)
    assert [len(row) for row in all_scores] == [len(cands) for cands in sets]
    for src, cands, chosen, score, row in zip(sources, sets, selected, scores, all_scores):
        direct = [nar.direct(src, c) if len(c) <= 10 else float("-inf") for c in cands]
        assert row == pytest.approx(direct, abs=1e-5)        # -inf exactly where it cannot score
        best = max(direct)
        assert chosen in cands
        assert direct[cands.index(chosen)] == pytest.approx(best, abs=1e-5) or best == float("-inf")
        assert score == pytest.approx(best, abs=1e-5) or (best == score == float("-inf"))


class ModalTableNAR(TableNAR):
    """TableNAR with a train mode, in which its scores are noisy as dropout would make them (here:
    one nat lower per token), that notes whether each call runs under the run's bf16 autocast."""

    def __init__(self, seed):
        super().__init__(seed)
        self.training, self.under_bf16 = True, []

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def noted(self):
        # a matrix product comes out in bf16 exactly where CPU bf16 autocast is on
        self.under_bf16.append((torch.ones(1, 1) @ torch.ones(1, 1)).dtype == torch.bfloat16)

    def score(self, src, tgt):
        self.noted()
        return super().score(src, tgt) - (tgt != 0).sum(1) * float(self.training)

    def encode(self, src):
        self.noted()
        return super().encode(src)

    def nar_logits(self, lengths, enc, enc_keep, max_tgt_len=None):
        return super().nar_logits(lengths, enc, enc_keep, max_tgt_len) - float(self.training)


@pytest.mark.exercise(7)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_selection_scores_in_eval_mode_and_the_runs_precision(precision):
    # A model handed over in train mode: the E-step scores it as nar_scores does, in eval mode
    # (dropout would make the scores noisy) and under the run's precision (bf16 autocast for a bf16
    # run; none for fp32).
    nar = ModalTableNAR(0)
    sources, sets = [[4, 5], [6]], [[[5, 6, 7, 8], [6]], [[9, 9], [7, 4, 4], []]]
    run = types.SimpleNamespace(decode_tokens=64, device="cpu", precision=precision)
    scores = em_nat.candidate_nar_scores(run, nar, sources, sets)
    direct = [[nar.direct(src, c) for c in cands] for src, cands in zip(sources, sets)]
    assert scores == [pytest.approx(row, abs=1e-5) for row in direct]
    assert nar.under_bf16 and all(on == (precision == "bf16") for on in nar.under_bf16)


def tiny_nar(seed=0, sharpness=4.0):
    torch.manual_seed(seed)
    nar = Transformer(ModelConfig(vocab_size=20, kind="nar", d_model=32, n_heads=4, d_ff=64,
                                  enc_layers=1, dec_layers=1, dropout=0.0, max_len=10)).eval()
    with torch.no_grad():
        nar.embed.weight.mul_(sharpness)
    return without_exercise_2(nar)


def without_exercise_2(nar):
    """The NAR model's decoder states from a stand-in of its own (the encoder summary plus position
    embeddings), so that exercise 7's grading does not depend on exercise 2's decoder input."""
    def states(lengths, enc, enc_keep, max_tgt_len=None):
        t = int(lengths.max()) if max_tgt_len is None else max_tgt_len
        return enc[:, :1] + nar.tgt_pos.weight[:t][None] * 4.0                  # (batch, t, d)
    nar.nar_states = states
    return nar


def by_hand_nar_score(nar, src, cand):
    """log p(T|x) + sum_t log p(y_t|x,T) of one candidate, by hand from the length classifier's
    and the decoder's logits, one sentence at a time (-inf for an empty candidate)."""
    if not cand:
        return float("-inf")
    with torch.no_grad():
        enc, keep = nar.encode(torch.tensor([src]))
        length_logp = nar.length_logits(enc)[0].float().log_softmax(-1)[len(cand)]
        logp = token_log_probs(nar, src, len(cand))
    return float(length_logp) + sum(float(logp[i, y]) for i, y in enumerate(cand))


@pytest.mark.exercise(7)
@torch.no_grad()
def test_the_nar_score_of_a_padded_batch_by_hand():
    # Transformer.score on one batch of sentences with their own sources (so their own length
    # distributions) and targets of different lengths, PAD-padded (one of 1 token, one of max_len):
    # each sentence's score as computed by hand, one at a time.
    nar, rng = tiny_nar(seed=2, sharpness=2.0), random.Random(2)
    nar.length_logits = lambda enc: 3 * enc[:, 0, :11]       # its own (not exercise 1's)
    sources = [[rng.randint(4, 19) for _ in range(n)] for n in (3, 6, 2, 5)]
    targets = [[rng.randint(4, 19) for _ in range(n)] for n in (4, 1, 10, 7)]
    pad = lambda rows: torch.tensor([r + [0] * (max(map(len, rows)) - len(r)) for r in rows])
    got = nar.score(pad(sources), pad(targets))
    assert got.shape == (4,)
    expected = [by_hand_nar_score(nar, s, t) for s, t in zip(sources, targets)]
    assert got.tolist() == pytest.approx(expected, abs=1e-4)


def token_log_probs(nar, src, length):
    """(length, vocab) log p(y_t | x, T = length) by hand from the decoder's logits."""
    enc, keep = nar.encode(torch.tensor([src]))
    return nar.nar_logits(torch.tensor([length]), enc, keep)[0].float().log_softmax(-1)


def select(nar, src, candidates):
    run = types.SimpleNamespace(decode_tokens=64, device="cpu", precision="fp32")
    return nar_choice(run, nar, [src], [candidates])[0][0]


@pytest.mark.exercise(7)
@torch.no_grad()
def test_selection_decided_by_the_length_term_alone():
    # The length classifier is made to be sure of length 3. The best 2-token candidate has the
    # higher token log-likelihood, but the full score log p(T|x) + sum_t log p(y_t|x,T) picks the
    # 3-token one.
    nar, src = tiny_nar(), [4, 5, 6, 7]
    nar.length_logits = lambda enc: torch.zeros(enc.size(0), 11).index_fill(
        1, torch.tensor([3]), 30.0)
    short = token_log_probs(nar, src, 2).argmax(-1).tolist()
    long = token_log_probs(nar, src, 3).argmax(-1).tolist()
    token_sum = lambda c: float(
        token_log_probs(nar, src, len(c)).gather(1, torch.tensor(c)[:, None]).sum())
    # without the length term: short wins
    assert token_sum(short) > token_sum(long)
    assert select(nar, src, [short, long]) == long


@pytest.mark.exercise(7)
@torch.no_grad()
def test_selection_is_not_length_normalised():
    # Lengths 1 and 4 equally likely. A 1-token candidate whose total score beats a 4-token one
    # while its score per token is worse: the un-normalised score (official score_nat.py) keeps the
    # short one.
    nar, src = tiny_nar(seed=1, sharpness=1.0), [4, 9, 13]
    nar.length_logits = lambda enc: torch.full((enc.size(0),
                                                11), -1e4).index_fill(1, torch.tensor([1, 4]), 0.0)
    length_term = -math.log(2)
    long_lp = token_log_probs(nar, src, 4)
    long = long_lp.argmax(-1).tolist()
    long_total = length_term + float(long_lp.max(-1).values.sum())
    one = token_log_probs(nar, src, 1)[0]
    shorts = [[y] for y in range(4, 20)
              # better total, worse per token
              if long_total < length_term + float(one[y]) < long_total / 4]
    assert shorts, "the test needs such a candidate; change the seed"
    assert select(nar, src, [long, shorts[0]]) == shorts[0]
    assert select(nar, src, [shorts[0], long]) == shorts[0]


def test_alignment_entropy_known_answers():
    rng = random.Random(0)
    words = list(range(10, 20))
    consistent, two_ways = [], []
    for _ in range(400):
        src = rng.sample(words, 4)
        # one translation per word
        consistent.append((src, [w + 100 for w in src]))
        two_ways.append((src, [w + rng.choice([100, 200]) for w in src]))    # two, chosen at random
    assert report.alignment_entropy(consistent) < 0.05
    assert abs(report.alignment_entropy(two_ways) - 1.0) < 0.1


# Small batches (512 tokens) keep a whole two-iteration run near half a minute: these tests check
# what the pipeline does with its models, not how good the models get.
TINY = ["--toy-train-size", "300", "--ar-steps", "60", "--nar-steps", "40", "--valid-every", "20",
        "--warmup", "20", "--max-tokens", "512", "--em-iterations", "2", "--candidates", "4",
        "--speed-sentences", "3", "--device", "cpu"]


STAGES = ["ar", "nar-raw", "nar-kd", "em1-ar", "em1-nar", "em2-ar", "em2-nar"]


def tiny_config(out, extra=()):
    return em_nat.run_config(em_nat.build_parser().parse_args(TINY + ["--out", str(out), *extra]))


def run_tiny(out, extra=()):
    em_nat.run_pipeline(tiny_config(out, extra))
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def quality_columns(results):
    keys = ("stage", "bleu", "valid_rate", "repeats", "targets_entropy", "mode_entropy", "invalid")
    return [{k: r[k] for k in keys} for r in results]


def read_lines(path):
    return path.read_text().split("\n")[:-1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One finished tiny run (two EM iterations), shared by the tests that only read it or copy it:
    (its directory, its results)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    return out, run_tiny(out)


def copy_of(run_dir, to, keep_stages):
    """A copy of a finished run as a run stopped after `keep_stages` would have left it."""
    shutil.copytree(run_dir, to)
    for stage in STAGES[keep_stages:]:
        shutil.rmtree(to / stage)
    for name in ("results.json", "results.txt"):
        os.remove(to / name)


def test_pipeline_artefacts_and_resume(tiny_run, tmp_path, monkeypatch):
    full_dir, full = tiny_run
    assert [r["stage"] for r in full] == STAGES
    for stage in STAGES:
        for name in ("model.pt", "config.json", "vocab.txt", "result.json", "train.tgt"):
            assert os.path.isfile(full_dir / stage / name), (stage, name)
        assert not os.path.exists(full_dir / stage / "resume.pt")
        # the test outputs
        for decoder in (["beam"] if stage == "ar" or stage.endswith("-ar")
                        else ["argmax", "ODD", "NPD"]):
            lines = read_lines(full_dir / stage / f"test.{decoder}.txt")
            assert len(lines) == 300 and all(line.strip() for line in lines[:5]), (stage, decoder)

    # A run that finished its first four stages (copied from the full run) is killed inside the
    # em1-nar stage's training loop; the same command again must end where the full run ended.
    copy_of(full_dir, tmp_path / "resumed", keep_stages=STAGES.index("em1-nar"))
    real_train_model = train.train_model

    def crash_in_em1_nar(model, pairs, valid, cfg, out_dir, desc="train", meta=None):
        if desc == "em1-nar":
            raise KeyboardInterrupt
        return real_train_model(model, pairs, valid, cfg, out_dir, desc, meta)

    monkeypatch.setattr(em_nat, "train_model", crash_in_em1_nar)
    with pytest.raises(KeyboardInterrupt):
        run_tiny(tmp_path / "resumed")
    assert os.path.isfile(tmp_path / "resumed" / "em1-ar" / "result.json")
    assert not os.path.exists(tmp_path / "resumed" / "em1-nar" / "result.json")
    monkeypatch.setattr(em_nat, "train_model", real_train_model)
    resumed = run_tiny(tmp_path / "resumed")
    assert quality_columns(resumed) == quality_columns(full)


class StandInModel(types.SimpleNamespace):
    """What a stand-in stage's handle.model() returns: the stage's name and kind, nothing else."""

    def __str__(self):
        return f"{self.name} model"


def loop_with_stand_in_stages(monkeypatch, iterations, distillation_targets=None, finished=()):
    """Run em_nat.em_loop on stand-in stages, E-step and distillation (no training, nothing else
    graded), and record what each stage is trained on (None: finished, its targets not computed),
    starts from and is rescored by, and which models were loaded. The stand-in e_step takes its
    arguments as Run.e_step does: (stage, AR model, NAR model, iteration)."""
    calls, loaded, training = [], [], []

    class Run:
        em = types.SimpleNamespace(iterations=iterations, selection="nar")
        cfg = types.SimpleNamespace(data=types.SimpleNamespace(
            distillation_targets=distillation_targets))
        train_ids = [([4], [5]), ([6], [7])]
        train_sources = [[4], [6]]
        results = "results"

        def stage(self, name, kind, trained_on, make_targets, init_from=None, rescorer=None):
            training.append(name)
            targets = None if name in finished else make_targets()
            calls.append((name, kind, targets, getattr(init_from, "name", None),
                          getattr(rescorer, "name", None)))

            def model():
                loaded.append(name)
                return StandInModel(name=name, kind=kind)
            return types.SimpleNamespace(name=name, model=model)

        def read_distillation_targets(self, path):
            return f"targets read from {path}"

        def e_step(self, stage, ar, nar, iteration):
            # Run.e_step's signature (positional or keyword): the stage it computes the targets
            # of, the AR model that proposes Q, the NAR model that selects in it, the iteration.
            # The models come as stage handles (loaded here, as Run.e_step loads them) or as
            # models.
            ar, nar = (m.model() if isinstance(m, types.SimpleNamespace) else m for m in (ar, nar))
            call = f"e_step({stage!r}, {ar}, {nar}, {iteration!r})"
            assert isinstance(ar, StandInModel) and ar.kind == "ar", \
                f"e_step's second argument is the AR model that proposes Q: {call}"
            assert isinstance(nar, StandInModel) and nar.kind == "nar", \
                f"e_step's third argument is the NAR model that selects in Q: {call}"
            assert isinstance(iteration, int) and not isinstance(iteration, bool), call
            assert stage == training[-1], \
                f"e_step's stage is the one it computes the targets of, {training[-1]}: {call}"
            return f"Q of {ar}, chosen by {nar} (iteration {iteration})"

    monkeypatch.setattr(em_nat, "distil", lambda run, ar_model: f"outputs of {ar_model}")
    assert em_nat.em_loop(Run()) == "results"
    return calls, loaded


@pytest.mark.exercise(8)
@pytest.mark.parametrize("iterations, distillation_targets", [(0, None), (2, None), (1, "kd.tgt")])
def test_the_loop_with_stand_in_stages(monkeypatch, iterations, distillation_targets):
    # Which model proposes Q, which selects in it, what every model is trained on, starts from and
    # is rescored by; the first NAR model's targets are AR_0's outputs, or the precomputed ones of
    # --distillation-targets.
    calls, _ = loop_with_stand_in_stages(monkeypatch, iterations, distillation_targets)
    kd = (f"targets read from {distillation_targets}" if distillation_targets
          else "outputs of ar model")
    expected = [("ar", "ar", [[5], [7]], None, None),
                ("nar-raw", "nar", [[5], [7]], None, "ar"),
                ("nar-kd", "nar", kd, None, "ar"),
                ("em1-ar", "ar", "Q of ar model, chosen by nar-kd model (iteration 1)", "ar", None),
                ("em1-nar", "nar", "outputs of em1-ar model", "nar-kd", "em1-ar"),
                ("em2-ar", "ar", "Q of em1-ar model, chosen by em1-nar model (iteration 2)",
                 "em1-ar", None),
                ("em2-nar", "nar", "outputs of em2-ar model", "em1-nar", "em2-ar")]
    assert calls == expected[:3 + 2 * iterations]


@pytest.mark.exercise(8)
def test_the_loop_resumed_after_its_last_stage_recomputes_nothing(monkeypatch):
    # Every stage already finished: the loop walks through them, but no targets are computed (no
    # distillation, no E-step) and no model is loaded.
    finished = ["ar", "nar-raw", "nar-kd", "em1-ar", "em1-nar", "em2-ar", "em2-nar"]
    calls, loaded = loop_with_stand_in_stages(monkeypatch, 2, finished=finished)
    assert [name for name, *_ in calls] == finished
    assert all(targets is None for _, _, targets, *_ in calls)
    assert loaded == [], f"models loaded although every stage is finished: {loaded}"


def test_the_loop_runs_in_the_papers_order(tiny_run):
    # Which model proposes Q, which selects within it, which model's outputs each NAR model learns:
    # recomputed from the saved models and compared with the saved targets.
    out, _ = tiny_run
    run = em_nat.Run(tiny_config(out))
    load = lambda name: em_nat.LazyModel(run, name).model()
    assert run.read_ids(str(out / "nar-raw" / "train.tgt")) == [t for _, t in run.train_ids]
    assert run.read_ids(str(out / "nar-kd" / "train.tgt")) == em_nat.distil(run, load("ar"))
    for i, (proposer, selector) in enumerate([("ar", "nar-kd"), ("em1-ar", "em1-nar")], start=1):
        candidates, scores = nbest_ids(load(proposer), run.train_sources, 4, alpha=1.0,
                                       max_tokens=run.decode_tokens)
        assert run.read_ids(str(out / f"em{i}-ar" / "candidates.tgt")) == [
            c for cs in candidates for c in cs]
        q = [em_nat.quality_constrained_set(c, s, run.em.quality_margin)
             for c, s in zip(candidates, scores)]
        chosen, _ = nar_choice(run, load(selector), run.train_sources, q)
        assert run.read_ids(str(out / f"em{i}-ar" / "train.tgt")) == chosen
        assert run.read_ids(str(out / f"em{i}-nar" / "train.tgt")) == em_nat.distil(
            run, load(f"em{i}-ar"))
    # The margin study re-selects the first E-step for other margins: at the run's own margin it
    # must find what the run did; with margin 0, Q is the AR top-1 alone.
    saved = json.loads((out / "em1-ar" / "result.json").read_text())
    same, top1_only, *held_out = em_nat.margin_study(tiny_config(out),
                                                     margins=(run.em.quality_margin, 0.0))
    for key in ("q_size", "q_top1", "q_valid", "q_sources_with_valid", "invalid", "mode_entropy"):
        assert same[key] == pytest.approx(saved[key]), key
    assert top1_only["q_size"] == 1.0 and top1_only["q_top1"] == 100.0
    assert [r["sources"] for r in held_out] == ["test", "test"] and held_out[1]["q_top1"] == 100.0


def test_controls_share_the_first_stages_and_select_as_they_say(tmp_path):
    # Q = all 4 candidates; shorter training and a narrower length window than the others' (the
    # test checks which candidates are chosen, not how good they are)
    cfg = tiny_config(tmp_path, ["--em-iterations", "1", "--quality-margin", "none", "--ar-steps",
                                 "30", "--nar-steps", "20", "--length-beam", "2"])
    by_stage = em_nat.run_seeds(cfg, [3], ["nar", "random", "ar-top1"])
    assert sorted(by_stage) == sorted((sel, st) for sel in ("nar", "random", "ar-top1")
                                      for st in STAGES[:5])
    for stage in ("ar", "nar-raw", "nar-kd"):                          # copied, not retrained
        assert {by_stage[(sel, stage)][0]["bleu"] for sel in ("nar", "random", "ar-top1")} == {
            by_stage[("nar", stage)][0]["bleu"]}
    chosen = {}
    for sel, directory in (("nar", "seed3"), ("random", "seed3-random"),
                           ("ar-top1", "seed3-ar-top1")):
        candidates = read_lines(tmp_path / directory / "em1-ar" / "candidates.tgt")
        assert candidates == read_lines(tmp_path / "seed3" / "em1-ar" / "candidates.tgt")
        groups = [candidates[4 * j:4 * j + 4] for j in range(300)]
        chosen[sel] = read_lines(tmp_path / directory / "em1-ar" / "train.tgt")
        assert all(c in g for c, g in zip(chosen[sel], groups))
    assert chosen["ar-top1"] == [g[0] for g in groups]
    rng = random.Random(3 * 7919 + 1)
    assert chosen["random"] == [rng.choice(g) for g in groups]
    assert chosen["nar"] != chosen["ar-top1"] and chosen["nar"] != chosen["random"]
    assert (tmp_path / "seeds.txt").read_text().count("\n") == 1 + 2 * (4 + 3 * 5)    # two tables


def test_the_e_step_takes_the_scorers_favourite_within_q_and_nothing_else():
    # Two sources, three AR candidates each; the scorer prefers later candidates. Source 0's third
    # candidate is more than 1 nat below the AR best: outside Q, so never chosen.
    nbest = NBest.from_lists(3, [[[4], [5], [6]], [[7], [8], [9]]],
                             [[-1.0, -1.5, -3.0], [-0.5, -0.6, -0.7]])
    seen = []

    def score(sets):
        seen.append(sets)
        return [[float(j) for j in range(len(q))] for q in sets]

    paper = em_nat.e_step(nbest, score, em_nat.EMConfig(quality_margin=1.0), seed=5)
    assert seen == [[[[4], [5]], [[7], [8], [9]]]] and paper.sets == seen[0]
    assert paper.targets == [[5], [9]] and paper.nar_scores == [[0.0, 1.0], [0.0, 1.0, 2.0]]
    top1 = em_nat.e_step(nbest, score, em_nat.EMConfig(selection="ar-top1"), seed=5)
    assert top1.targets == [[4], [7]]
    rng = random.Random(5)
    drawn = em_nat.e_step(nbest, score, em_nat.EMConfig(selection="random"), seed=5)
    assert drawn.targets == [rng.choice(q) for q in paper.sets]


def test_quality_margin_keeps_the_candidates_near_the_ar_best():
    cands = [[4], [5], [6], [7]]
    assert em_nat.quality_constrained_set(cands, [-1.0, -1.5, -2.2, -9.0], None) == cands
    assert em_nat.quality_constrained_set(cands, [-1.0, -1.5, -2.2, -9.0], 1.1) == [[4], [5]]
    assert em_nat.quality_constrained_set(cands, [-1.0, -1.5, -2.2, -9.0], 0.0) == [[4]]


def test_a_confidence_scaled_margin_narrows_q_where_the_ar_model_is_sure():
    cands = [[4], [5], [6], [7]]
    # "Cx": within C times -score of the top-1. Best -1.0: 1.1x is 1.1 nats.
    assert em_nat.quality_constrained_set(cands, [-1.0, -1.5, -2.2, -9.0], "1.1x") == [[4], [5]]
    # The same gaps under a confident top-1 (-0.2): 1.1x is 0.22 nats, Q is the top-1 alone ...
    assert em_nat.quality_constrained_set(cands, [-0.2, -0.7, -1.4, -8.2], "1.1x") == [[4]]
    # ... and an unsure one (-2.0): 2.2 nats, three candidates.
    assert em_nat.quality_constrained_set(cands, [-2.0, -2.5, -3.2, -10.0], "1.1x") == cands[:3]
    assert [em_nat.margin_value(t) for t in ("0.5x", "2", "none",
                                             "3x")] == ["0.5x", 2.0, None, "3x"]
    for bad in ("-1", "x", "abc", "nan", "-0.5x"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a number of nats"):
            em_nat.margin_value(bad)


def test_target_modes_known_answers():
    corpus = em_nat.make_toy_corpus(seed=1, train_size=60)
    run = types.SimpleNamespace(corpus=corpus)
    toy, vocab = run.corpus.toy, run.corpus.vocab
    first_mode = [vocab.encode(toy.valid_translations(s)[0].split()) for s, _ in run.corpus.train]
    modes = report.target_modes(corpus, first_mode)
    assert modes["mode_entropy"] == 0.0 and modes["invalid"] == 0.0
    assert modes["mode_shares"][0] == 100.0
    mixed = [vocab.encode(toy.valid_translations(s)[i % 2].split()) if i < 40 else [4]
             for i, (s, _) in enumerate(run.corpus.train)]
    modes = report.target_modes(corpus, mixed)
    assert abs(modes["mode_entropy"] - 1.0) < 1e-9 and abs(modes["invalid"] - 100 / 3) < 1e-9


def test_a_run_directory_refuses_other_settings(tiny_run, tmp_path):
    copy_of(tiny_run[0], tmp_path / "r", keep_stages=3)           # stopped after distillation
    for changed in (["--seed", "2"], ["--alpha", "1.4"], ["--kd-beam", "3"], ["--length-beam", "3"],
                    ["--quality-margin", "none"], ["--selection", "random"]):
        # a clear error, not a mixed run
        with pytest.raises(em_nat.CheckpointError, match="other settings"):
            em_nat.run_pipeline(tiny_config(tmp_path / "r", changed))


def test_printed_examples_mark_repeats_and_validity():
    corpus = em_nat.make_toy_corpus(seed=1, train_size=20)
    vocab = corpus.vocab
    # a valid translation, words in the vocabulary
    src, valid = corpus.train[0]
    repeated = vocab.encode(valid[:1] + valid[:1] + valid[1:])
    assert report.marked_text(corpus,
                              repeated) == " ".join(valid[:1] + [f"[{valid[0]}]"] + valid[1:])
    assert report.validity_mark(corpus, src, " ".join(valid)) == "   (valid)"
    assert report.validity_mark(corpus, src, " ".join(valid[:1] + valid)) == "   (invalid)"
    bpe_corpus = types.SimpleNamespace(vocab=em_nat.Vocab.build([["a@@", "b", "c"]]), is_bpe=True)
    ids = bpe_corpus.vocab.encode(["a@@", "b", "a@@", "a@@", "b", "c", "c"])
    assert report.marked_text(bpe_corpus, ids) == "ab a[a]b c [c]"


def test_cross_fitted_selection_never_scores_a_source_with_a_model_that_trained_on_it(
        tmp_path, monkeypatch):
    trained_on, scored_by = {}, {}
    real_train_model, real_scores = em_nat.train_model, em_nat.candidate_nar_scores

    def recording_train_model(model, pairs, valid, cfg, out_dir, desc="train", meta=None):
        model, summary = real_train_model(model, pairs, valid, cfg, out_dir, desc, meta)
        if "fold" in desc:
            trained_on[desc] = {tuple(s) for s, _ in pairs}
            model.judge = desc
        return model, summary

    def recording_scores(run, nar_model, sources, sets):
        scored_by.setdefault(getattr(nar_model, "judge",
                                     None), set()).update(tuple(s) for s in sources)
        return real_scores(run, nar_model, sources, sets)

    monkeypatch.setattr(em_nat, "train_model", recording_train_model)
    monkeypatch.setattr(em_nat, "candidate_nar_scores", recording_scores)
    results = run_tiny(tmp_path, ["--em-iterations", "1", "--selection", "nar-crossfit",
                                  "--crossfit-folds", "3", "--ar-steps", "30", "--nar-steps", "20",
                                  "--length-beam", "2"])
    assert [r["stage"] for r in results] == STAGES[:5]
    assert sorted(trained_on) == [f"em1-ar fold {k}"
                                  for k in range(3)] and set(scored_by) == set(trained_on)
    sources = {tuple(s) for s, _ in em_nat.make_toy_corpus(seed=1, train_size=300).ids("train")}
    assert set().union(*scored_by.values()) == sources
    for judge, scored in scored_by.items():
        # never a source the judge trained on
        assert scored and not scored & trained_on[judge], judge
        # trained on all the other folds
        assert trained_on[judge] | scored == sources


def test_paired_differences_over_seeds_known_answers():
    # valid% of three seeds: KD, EM1 and the AR top-1 control at EM1; EM1 - KD = 4, 3, 3: mean
    # 10/3, sample sd sqrt(1/3), 2 SE = 2 sqrt(1/3) / sqrt(3) = 2/3
    def results(*valid):
        return [{"valid_rate": v, "bleu": 0.0, "kind": "nar"} for v in valid]
    by_stage = {("nar", "ar"): results(99, 99, 99), ("nar", "nar-kd"): results(86, 87, 91),
                ("nar", "em1-nar"): results(90, 90, 94),
                ("ar-top1", "em1-nar"): results(91, 88, 94)}
    assert report.paired_comparisons(by_stage) == [
        ("em1-nar - nar-kd", ("nar", "em1-nar"), ("nar", "nar-kd")),
        ("em1-nar: nar - ar-top1", ("nar", "em1-nar"), ("ar-top1", "em1-nar"))]
    diffs, mean, two_se = report.paired_difference([90, 90, 94], [86, 87, 91])
    assert diffs == [4, 3, 3] and mean == pytest.approx(10 / 3)
    assert two_se == pytest.approx(2 / 3)
    assert report.paired_difference([5.0], [2.0]) == ([3.0], 3.0, None)
    table = report.format_paired_differences(by_stage, toy=True, seeds=[1, 2, 3])
    em1_kd, nar_top1 = table.splitlines()[3:]
    assert em1_kd.split()[-8:] == ["+4.0", "+3.0", "+3.0", "+3.33", "0.67", "3", "of", "3"]
    # the AR top-1 control: -1, +2, 0: mean 1/3, 2 SE 2 sqrt(7/3) / sqrt(3) = 1.76, ahead on one
    assert nar_top1.split()[-8:] == ["-1.0", "+2.0", "+0.0", "+0.33", "1.76", "1", "of", "3"]
    # a setting run on fewer seeds than the study's is left out, not paired with the wrong seeds
    by_stage[("random", "em1-nar")] = results(80, 81)
    assert len(report.format_paired_differences(by_stage, True, [1, 2, 3]).splitlines()) == 5
