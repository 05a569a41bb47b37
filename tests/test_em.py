"""em_nat.py: selection by NAR likelihood, the multi-modality measure, and the whole pipeline on a
tiny setting (artefacts, selections among the candidates, resume = uninterrupted run)."""
import json
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
    args = train.build_parser().parse_args(TINY + ["--out", str(tmp_path / "r"), "--seed", "2"])
    assert em_nat.main(args) == 1                              # a clear error, not a mixed run
