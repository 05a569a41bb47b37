"""em_nat.py: selection by NAR likelihood, the multi-modality measure, and the whole pipeline on a
tiny setting (artefacts, selections among the candidates, resume = uninterrupted run)."""
import json
import math
import os
import random
import types

import pytest
import torch

import em_nat
import train
from model import ModelConfig, Transformer

torch.set_num_threads(2)


def test_selection_keeps_the_candidate_with_the_highest_nar_score():
    torch.manual_seed(0)
    nar = Transformer(ModelConfig(vocab_size=12, kind="nar", d_model=32, n_heads=4, d_ff=64, enc_layers=1,
                                  dec_layers=1, dropout=0.0, max_len=10)).eval()
    rng = random.Random(0)
    sources = [[rng.randint(4, 11) for _ in range(rng.randint(2, 6))] for _ in range(7)]
    candidates = [[[rng.randint(4, 11) for _ in range(rng.randint(1, 7))] for _ in range(5)] for _ in sources]
    candidates[0][2] = []                                      # an empty AR output can never be chosen
    run = types.SimpleNamespace(decode_tokens=64, device="cpu", autocast=False)
    selected, scores = em_nat.select_by_nar_likelihood(nar, sources, candidates, run)
    for src, cands, chosen, score in zip(sources, candidates, selected, scores):
        direct = [float(nar.score(torch.tensor([src]), torch.tensor([c]))) if c else float("-inf") for c in cands]
        assert chosen == cands[max(range(len(cands)), key=direct.__getitem__)]
        assert abs(score - max(direct)) < 1e-4


def tiny_nar(seed=0, sharpness=4.0):
    torch.manual_seed(seed)
    nar = Transformer(ModelConfig(vocab_size=20, kind="nar", d_model=32, n_heads=4, d_ff=64, enc_layers=1,
                                  dec_layers=1, dropout=0.0, max_len=10)).eval()
    with torch.no_grad():
        nar.embed.weight.mul_(sharpness)
    return nar


def token_log_probs(nar, src, length):
    """(length, vocab) log p(y_t | x, T = length) by hand from the decoder's logits."""
    enc, keep = nar.encode(torch.tensor([src]))
    return nar.nar_logits(torch.tensor([length]), enc, keep)[0].float().log_softmax(-1)


def select(nar, src, candidates):
    run = types.SimpleNamespace(decode_tokens=64, device="cpu")
    return em_nat.select_by_nar_likelihood(nar, [src], [candidates], run)[0][0]


@torch.no_grad()
def test_selection_decided_by_the_length_term_alone():
    # The length classifier is made to be sure of length 3. The best 2-token candidate has the higher
    # token log-likelihood, but the full score log p(T|x) + sum_t log p(y_t|x,T) picks the 3-token one.
    nar, src = tiny_nar(), [4, 5, 6, 7]
    nar.length_logits = lambda enc: torch.zeros(enc.size(0), 11).index_fill(1, torch.tensor([3]), 30.0)
    short = token_log_probs(nar, src, 2).argmax(-1).tolist()
    long = token_log_probs(nar, src, 3).argmax(-1).tolist()
    token_sum = lambda c: float(token_log_probs(nar, src, len(c)).gather(1, torch.tensor(c)[:, None]).sum())
    assert token_sum(short) > token_sum(long)                    # without the length term: short wins
    assert select(nar, src, [short, long]) == long


@torch.no_grad()
def test_selection_is_not_length_normalised():
    # Lengths 1 and 4 equally likely. A 1-token candidate whose total score beats a 4-token one while
    # its score per token is worse: the un-normalised score (official score_nat.py) keeps the short one.
    nar, src = tiny_nar(seed=1, sharpness=1.0), [4, 9, 13]
    nar.length_logits = lambda enc: torch.full((enc.size(0), 11), -1e4).index_fill(1, torch.tensor([1, 4]), 0.0)
    length_term = -math.log(2)
    long_lp = token_log_probs(nar, src, 4)
    long = long_lp.argmax(-1).tolist()
    long_total = length_term + float(long_lp.max(-1).values.sum())
    one = token_log_probs(nar, src, 1)[0]
    shorts = [[y] for y in range(4, 20)
              if long_total < length_term + float(one[y]) < long_total / 4]   # better total, worse per token
    assert shorts, "the test needs such a candidate; change the seed"
    assert select(nar, src, [long, shorts[0]]) == shorts[0]
    assert select(nar, src, [shorts[0], long]) == shorts[0]


def test_alignment_entropy_known_answers():
    rng = random.Random(0)
    words = list(range(10, 20))
    consistent, two_ways = [], []
    for _ in range(400):
        src = rng.sample(words, 4)
        consistent.append((src, [w + 100 for w in src]))                     # one translation per word
        two_ways.append((src, [w + rng.choice([100, 200]) for w in src]))    # two, chosen at random
    assert em_nat.alignment_entropy(consistent) < 0.05
    assert abs(em_nat.alignment_entropy(two_ways) - 1.0) < 0.1


TINY = ["--toy-train-size", "300", "--ar-steps", "60", "--nar-steps", "40", "--valid-every", "20", "--warmup", "20",
        "--em-iterations", "2", "--candidates", "4", "--speed-sentences", "3", "--device", "cpu"]


def run_tiny(out, extra=()):
    args = train.build_parser().parse_args(TINY + ["--out", str(out), *extra])
    assert em_nat.main(args) == 0
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def quality_columns(results):
    keys = ("stage", "bleu", "valid_rate", "repeats", "targets_entropy")
    return [{k: r[k] for k in keys} for r in results]


def test_pipeline_artefacts_selection_and_resume(tmp_path, monkeypatch):
    full = run_tiny(tmp_path / "full")
    stages = em_nat.stage_list(2)
    assert [r["stage"] for r in full] == stages
    for stage in stages:
        for name in ("model.pt", "config.json", "vocab.txt", "result.json"):
            assert os.path.isfile(tmp_path / "full" / stage / name), (stage, name)
        assert not os.path.exists(tmp_path / "full" / stage / "resume.pt")
    for i in (1, 2):
        stage = tmp_path / "full" / f"em{i}-ar"
        candidates = (stage / "candidates.tgt").read_text().split("\n")[:-1]
        selected = (stage / "train.tgt").read_text().split("\n")[:-1]
        assert len(candidates) == 4 * len(selected) == 4 * 300
        for j, sentence in enumerate(selected):
            assert sentence in candidates[4 * j:4 * j + 4]

    # Kill the run inside the em1-nar stage's training loop, then run the same command again.
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


def test_a_run_directory_refuses_other_settings(tmp_path):
    run_tiny(tmp_path / "r", extra=["--em-iterations", "0"])
    for changed in (["--seed", "2"], ["--alpha", "1.4"], ["--kd-beam", "3"], ["--length-beam", "3"]):
        args = train.build_parser().parse_args(TINY + ["--out", str(tmp_path / "r"), "--em-iterations", "0", *changed])
        assert em_nat.main(args) == 1                          # a clear error, not a mixed run
