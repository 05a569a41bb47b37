"""Bad input and interruptions: clear one-line errors, atomic checkpoints, exact resume."""
import os
import random
import subprocess
import sys

import pytest
import torch

import em_nat
import train
from data import DataError, Vocab
from decode import load_rescorer, load_translator
from model import (SPECIALS, CheckpointError, ModelConfig, Transformer, load_checkpoint,
                   save_checkpoint, write_atomic)
from train import TrainConfig, TrainingError, train_model

torch.set_num_threads(2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=14, kind="ar", d_model=32, n_heads=4, d_ff=64,
                                   enc_layers=1, dec_layers=1, dropout=dropout, max_len=16))


def copy_pairs(n=400, seed=0):
    rng = random.Random(seed)
    return [(s, s) for s in ([rng.randint(4, 13) for _ in range(rng.randint(2, 8))]
                             for _ in range(n))]


class StopAfter(dict):
    """Stands in for the Ctrl-C flag: reports 'stop' once the loop has asked `steps` times."""

    def __init__(self, steps):
        super().__init__()
        self.asked, self.steps = 0, steps

    def __getitem__(self, key):
        self.asked += 1
        return self.asked >= self.steps


def test_ctrl_c_then_resume_gives_the_same_weights(tmp_path, monkeypatch):
    pairs, valid = copy_pairs(), copy_pairs(50, seed=1)
    cfg = TrainConfig(lr=2e-3, warmup=10, max_tokens=128, ar_steps=45, valid_every=20)
    straight, _ = train_model(tiny_model(), pairs, valid, cfg, str(tmp_path / "straight"))

    class FakeInterrupt:
        def __enter__(self):
            return StopAfter(27)                              # "Ctrl-C" during step 27, mid-epoch

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(train, "graceful_interrupt", FakeInterrupt)
    with pytest.raises(train.Stopped, match="stopped at step 27"):
        train_model(tiny_model(), pairs, valid, cfg, str(tmp_path / "resumed"))
    monkeypatch.undo()
    resumed, _ = train_model(tiny_model(seed=99), pairs, valid, cfg, str(tmp_path / "resumed"))
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_a_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_good_weights(tmp_path):
    pairs, valid = copy_pairs(), copy_pairs(50, seed=1)
    out = tmp_path / "nan"
    train_model(tiny_model(), pairs, valid,
                TrainConfig(lr=1e-3, warmup=5, max_tokens=128, ar_steps=10,
                                                        valid_every=10), str(out))
    good = torch.load(out / "model.pt")
    os.remove(out / "resume.pt")
    with pytest.raises(TrainingError, match=r"loss became (nan|inf).*lower --lr"):
        train_model(tiny_model(), pairs, valid,
                    TrainConfig(lr=1e30, warmup=1, max_tokens=128, ar_steps=50,
                                                            valid_every=100, clip=1e30), str(out))
    kept = torch.load(out / "model.pt")
    assert all(torch.equal(good[k], kept[k]) for k in good)


def test_a_kill_during_a_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    write_atomic(str(path), {"w": torch.ones(3)})

    def dying_save(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(path), {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["w"], torch.ones(3))


def test_truncated_foreign_and_mismatched_checkpoints_say_so(tmp_path):
    model = tiny_model()
    save_checkpoint(model, str(tmp_path / "ok"))
    data = (tmp_path / "ok" / "model.pt").read_bytes()
    (tmp_path / "ok" / "model.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable, truncated"):
        load_checkpoint(str(tmp_path / "ok"))
    (tmp_path / "ok" / "model.pt").write_text("this is a text file, not a checkpoint")
    with pytest.raises(CheckpointError, match="unreadable, truncated"):
        load_checkpoint(str(tmp_path / "ok"))
    other = Transformer(ModelConfig(vocab_size=30, kind="ar", d_model=32, n_heads=4, d_ff=64,
                                    enc_layers=1, dec_layers=1, max_len=16))
    torch.save(other.state_dict(), tmp_path / "ok" / "model.pt")
    with pytest.raises(CheckpointError, match="do not fit the config"):
        load_checkpoint(str(tmp_path / "ok"))
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_checkpoint(str(tmp_path / "nowhere"))


def test_a_vocabulary_that_does_not_belong_to_the_checkpoint_is_refused(tmp_path):
    save_checkpoint(tiny_model(), str(tmp_path))
    Vocab(SPECIALS + ["a", "b"]).save(str(tmp_path / "vocab.txt"))
    with pytest.raises(CheckpointError, match="vocabulary does not belong"):
        load_translator(str(tmp_path), "cpu")


def test_cli_errors_are_one_line_without_a_traceback(tmp_path):
    (tmp_path / "train.de").write_text("a b\nc\n")
    (tmp_path / "train.en").write_text("x\n")
    (tmp_path / "valid.de").write_text("a\n")
    (tmp_path / "valid.en").write_text("x\n")
    result = subprocess.run([sys.executable, "train.py", "--data-dir", str(tmp_path), "--out",
                             str(tmp_path / "run"), "--bpe-merges", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "train.de has 2 lines but" in result.stderr and "train.en has 1" in result.stderr
    result = subprocess.run([sys.executable, "decode.py", "--checkpoint", str(tmp_path / "none")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "config.json: missing" in result.stderr


def test_an_empty_training_set_is_an_error_not_an_endless_loop(tmp_path):
    with pytest.raises(TrainingError, match="no training pairs left"):
        train_model(tiny_model(), [], copy_pairs(5), TrainConfig(ar_steps=5), str(tmp_path))


def test_out_of_memory_names_the_token_budget_to_lower(tmp_path, monkeypatch):
    model = tiny_model()

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(model, "forward", oom)
    with pytest.raises(TrainingError,
                       match=r"out of memory on a batch .* lower --max-tokens \(now 128\)"):
        train_model(model, copy_pairs(), copy_pairs(5), TrainConfig(ar_steps=5, max_tokens=128),
                    str(tmp_path))


def test_an_empty_validation_set_is_an_error(tmp_path):
    # With no validation pair there is no validation loss to report (nor, with --final-model best,
    # to choose the checkpoint by: it would stay the first one saved, silently).
    with pytest.raises(TrainingError, match="no validation pairs"):
        train_model(tiny_model(), copy_pairs(20), [], TrainConfig(ar_steps=5, device="cpu"),
                    str(tmp_path))
    for split in ("train", "valid"):
        (tmp_path / f"{split}.de").write_text("a b c d e f\n" * 5)
        (tmp_path / f"{split}.en").write_text("x y z w v u\n" * 5)
    args = em_nat.build_parser().parse_args(["--data-dir", str(tmp_path), "--bpe-merges", "0",
                                             "--max-len", "5",
                                            "--out", str(tmp_path / "run")])
    (tmp_path / "train.de").write_text("a b\n" * 5)
    (tmp_path / "train.en").write_text("x y\n" * 5)
    with pytest.raises(DataError, match="none of the 5 validation pairs is within --max-len 5"):
        em_nat.Run(em_nat.run_config(args))


def test_a_rescorer_from_another_run_is_refused(tmp_path):
    ar_dir = tmp_path / "ar"
    save_checkpoint(tiny_model(), str(ar_dir))
    Vocab(SPECIALS + [f"w{i}" for i in range(10)]).save(str(ar_dir / "vocab.txt"))
    other = Vocab(SPECIALS + [f"v{i}" for i in range(10)])
    with pytest.raises(CheckpointError, match="differs from the vocabulary of --checkpoint"):
        load_rescorer(str(ar_dir), other, "cpu")
    assert load_rescorer(str(ar_dir), Vocab.load(str(ar_dir / "vocab.txt")), "cpu").cfg.kind == "ar"
