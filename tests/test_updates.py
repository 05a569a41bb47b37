"""Updates that span several batches (gradient accumulation) or several processes (torchrun, DDP),
the stage's final model (last step, averaged checkpoints), run directories made before a setting
existed, and precomputed distillation targets. The multi-process tests start two CPU processes
(gloo) and compare them with one process doing the same work."""
import datetime
import json
import os
import random

import pytest
import torch
import torch.multiprocessing as mp

import em_nat
import train
from data import DataError, collate
from decode import nbest_ids, translate_ids
from model import ModelConfig, Transformer
from test_robustness import StopAfter              # the stand-in Ctrl-C flag
from train import TrainConfig, train_model

torch.set_num_threads(1)


def tiny_model(kind, seed=0):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=14, kind=kind, d_model=32, n_heads=4, d_ff=64,
                                   enc_layers=1, dec_layers=1, dropout=0.0, max_len=16))


def copy_pairs(n=300, seed=0):
    """Reversal pairs of random lengths (so batches differ in tokens and padding)."""
    rng = random.Random(seed)
    return [(s, s[::-1]) for s in ([rng.randint(4, 13) for _ in range(rng.randint(2, 9))]
                                   for _ in range(n))]


def same_weights(a, b, atol=1e-5):
    return all(torch.allclose(x, y, atol=atol, rtol=0)
               for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def sgd(model, cfg):
    """Plain SGD in place of AdamW where weights are compared: Adam divides by the gradient's size,
    so a parameter whose true gradient is zero (attention's key bias: softmax ignores a constant
    shift) moves by about lr on rounding noise alone, which differs between equal sums added up in
    another order. SGD keeps the comparison about the gradients, which is what accumulation and DDP
    change."""
    return torch.optim.SGD(model.parameters(), lr=cfg.lr)


def optimizer_and_schedule(model, cfg):
    optimizer = sgd(model, cfg)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, train.inverse_sqrt(cfg.warmup))


@pytest.mark.parametrize("kind", ["ar", "nar"])
def test_two_accumulated_half_batches_are_one_step_over_their_union(kind, tmp_path):
    # The halves differ in sentences and tokens, so dividing each half's loss by its own token count
    # (or the NAR length loss by its own sentences) would weigh them wrongly.
    pairs, cfg = copy_pairs(60), TrainConfig(lr=0.3, warmup=2)
    accumulated, union = tiny_model(kind), tiny_model(kind)
    opt_a, sched_a = optimizer_and_schedule(accumulated, cfg)
    opt_u, sched_u = optimizer_and_schedule(union, cfg)
    for step in range(3):
        chunk = pairs[20 * step:20 * step + 20]
        halves = [collate(chunk[:7]), collate(chunk[7:])]
        train.train_step(accumulated, opt_a, sched_a, halves, cfg, "acc", str(tmp_path), step + 1)
        train.train_step(union, opt_u, sched_u, [collate(chunk)], cfg, "union", str(tmp_path),
                         step + 1)
    assert same_weights(accumulated, union)
    assert not same_weights(accumulated, tiny_model(kind))               # it did train


def test_update_freq_trains_on_consecutive_batches_of_the_stream(monkeypatch):
    # update_freq K on one process takes K consecutive batches per update; rank r of N processes
    # takes the r-th run of K out of N x K: together the same batches as one process with
    # update_freq N x K.
    stream = lambda: iter([[i] for i in range(100)])
    one = train.update_batches(stream(), TrainConfig(update_freq=4))
    assert one == [[0], [1], [2], [3]]
    taken = []
    monkeypatch.setattr(train, "world_size", lambda: 2)
    for r in range(2):
        monkeypatch.setattr(train, "rank", lambda r=r: r)
        taken += train.update_batches(stream(), TrainConfig(update_freq=2))
    assert taken == one


# ----- the stage's final model --------------------------------------------------------------------
def test_last_step_and_averaged_checkpoints(tmp_path, monkeypatch):
    # Validation losses that only rise: the best checkpoint is the first one, so "best" and "last"
    # differ.
    losses = iter(range(100))
    monkeypatch.setattr(train, "validation_loss", lambda model, pairs, cfg: float(next(losses)))
    pairs = copy_pairs()
    common = dict(lr=2e-3, warmup=5, max_tokens=96, valid_every=4)
    at_step = {n: train_model(tiny_model("ar"), pairs, pairs[:10],
                              TrainConfig(ar_steps=n, final_model="last",
                                          **common), str(tmp_path / f"last{n}"))[0]
               for n in (4, 8, 12)}
    best, _ = train_model(tiny_model("ar"), pairs, pairs[:10],
                          TrainConfig(ar_steps=12, final_model="best", **common),
                          str(tmp_path / "best"))
    assert same_weights(best, at_step[4], atol=0) and not same_weights(best, at_step[12])
    averaged, _ = train_model(tiny_model("ar"), pairs, pairs[:10],
                              TrainConfig(ar_steps=12, final_model="last", average_last=2,
                                          **common), str(tmp_path / "avg"))
    for name, value in averaged.state_dict().items():
        mean = (at_step[8].state_dict()[name] + at_step[12].state_dict()[name]) / 2
        assert torch.allclose(value, mean, atol=1e-6), name
    saved = torch.load(tmp_path / "avg" / "model.pt")
    assert all(torch.equal(saved[k], v) for k, v in averaged.state_dict().items())
    assert [os.path.basename(p) for p in train.step_checkpoint_paths(str(tmp_path / "avg"))] == [
        "step8.pt", "step12.pt"]
    train.remove_loop_files(str(tmp_path / "avg"))
    assert sorted(os.listdir(tmp_path / "avg")) == ["config.json", "model.pt"]


def test_averaging_needs_the_last_checkpoints():
    with pytest.raises(ValueError, match="needs final_model 'last'"):
        TrainConfig(average_last=3, final_model="best")


# ----- run directories made before a setting existed ----------------------------------------------
TINY = ["--toy-train-size", "200", "--ar-steps", "6", "--nar-steps", "6", "--valid-every", "3",
        "--warmup", "3", "--em-iterations", "0", "--candidates", "3", "--speed-sentences", "2",
        "--device", "cpu"]


def tiny_config(out, extra=()):
    return em_nat.run_config(em_nat.build_parser().parse_args(TINY + ["--out", str(out), *extra]))


def test_a_run_json_of_another_format_or_other_settings_is_refused(tmp_path):
    em_nat.Run(tiny_config(tmp_path))
    path = tmp_path / "run.json"
    saved = json.loads(path.read_text())
    for changed, name in ((["--update-freq", "2"], "train.batches_per_update: 1 -> 2"),
                          (["--final-model", "best"], "train.final_model: last -> best"),
                          (["--ar-steps", "7"], "train.ar_steps: 6 -> 7")):
        with pytest.raises(em_nat.CheckpointError, match=name):
            em_nat.Run(tiny_config(tmp_path, changed))
    # as em-nat wrote run.json before formats
    del saved["format"]
    path.write_text(json.dumps(saved))
    with pytest.raises(em_nat.CheckpointError,
                       match="another version of em-nat .run format 1, this one reads 2"):
        em_nat.Run(tiny_config(tmp_path))


# ----- precomputed distillation targets -----------------------------------------------------------
def test_precomputed_distillation_targets_follow_the_lines_of_train_src(tmp_path):
    # line 2 empty, line 4 too long
    src = ["a b", "", "c d e", "a a a a a a a a", "b c"]
    (tmp_path / "train.de").write_text("\n".join(src) + "\n")
    (tmp_path / "train.en").write_text("x y\nz\nx z y\nx\ny x\n")
    for split in ("valid", "test"):
        (tmp_path / f"{split}.de").write_text("a b\n")
        (tmp_path / f"{split}.en").write_text("x y\n")
    kd = tmp_path / "kd.en"
    kd.write_text("y y\nnone\nz z z\nnone\nx\n")
    cfg = em_nat.run_config(em_nat.build_parser().parse_args(
        ["--data-dir", str(tmp_path), "--bpe-merges", "0", "--max-len", "5", "--out",
         str(tmp_path / "run"), "--distillation-targets", str(kd)]))
    run = em_nat.Run(cfg)
    words = [run.corpus.vocab.decode(t) for t in run.read_distillation_targets(str(kd))]
    # lines 1, 3 and 5, as the pairs kept
    assert words == [["y", "y"], ["z", "z", "z"], ["x"]]
    kd.write_text("y y\nz z z\nx\n")
    with pytest.raises(DataError, match="has 3 lines but the training sources have 5"):
        # at the start, not after training AR_0
        em_nat.Run(cfg)


# ----- two processes (torchrun's DistributedDataParallel, gloo on CPU) vs one --------------------
class Interrupt:
    def __init__(self, steps):
        self.steps = steps

    def __enter__(self):
        return StopAfter(self.steps)

    def __exit__(self, *exc):
        return False


DDP_CFG = dict(lr=0.3, warmup=4, max_tokens=64, nar_steps=10, valid_every=4)
SOURCES = [s for s, _ in copy_pairs(23, seed=5)]
# one source's candidates span ranks
CANDIDATE_SETS = [[s, s[::-1], s[1:] or s, s + s[:1]] for s in SOURCES]
SCORED_PAIRS = [(s, c) for s, cands in zip(SOURCES, CANDIDATE_SETS) for c in cands]


def dropout_nar():
    torch.manual_seed(11)
    return Transformer(ModelConfig(vocab_size=14, kind="nar", d_model=32, n_heads=4, d_ff=64,
                                   enc_layers=1, dec_layers=1, dropout=0.3, max_len=16))


def two_process_worker(rank, out):
    """One of two gloo processes: trains a NAR model (stopped at step 6 by a 'Ctrl-C' seen by rank 1
    only, then resumed), and decodes and scores a shard of SOURCES; rank 0 saves what it got."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank,
                                         # a hang fails, not stalls
                                         world_size=2, timeout=datetime.timedelta(seconds=90))
    pairs, real_graceful_interrupt = copy_pairs(), train.graceful_interrupt
    train.make_optimizer = sgd
    cfg = TrainConfig(update_freq=1, **DDP_CFG)
    train.graceful_interrupt = (lambda: Interrupt(6)) if rank == 1 else real_graceful_interrupt
    stopped_at = "not stopped"
    try:
        train_model(tiny_model("nar"), pairs, pairs[:20], cfg, os.path.join(out, "ddp"))
    except train.Stopped as stopped:
        stopped_at = str(stopped)
    train.graceful_interrupt = real_graceful_interrupt
    model, _ = train_model(tiny_model("nar", seed=7), pairs, pairs[:20], cfg,
                           os.path.join(out, "ddp"))
    ar = tiny_model("ar", seed=3).eval()
    beam = train.gather(translate_ids(ar, train.shard(SOURCES), method="beam", beam=3,
                                      max_tokens=40))
    nbest = [train.gather(part) for part in nbest_ids(ar, train.shard(SOURCES), 3, max_tokens=40)]
    run = type("R", (), {"decode_tokens": 40, "device": "cpu", "precision": "fp32"})
    # shards and gathers itself
    scores = em_nat.nar_scores(run, model, [(s, s) for s in SOURCES])
    # as a model could come out of a loop: dropout 0.3, train mode
    noisy = dropout_nar().train()
    noisy_scores = em_nat.nar_scores(run, noisy, SCORED_PAIRS)
    noisy.train()
    selected = em_nat.best_candidates(
        CANDIDATE_SETS, em_nat.candidate_nar_scores(run, noisy, SOURCES, CANDIDATE_SETS))[0]
    if rank == 0:
        torch.save({"model": model.state_dict(), "stopped": stopped_at, "beam": beam,
                    "nbest": nbest, "scores": scores, "noisy_scores": noisy_scores,
                    "selected": selected},
                   os.path.join(out, "rank0.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    # one retry: a rare gloo rendezvous stall on a loaded machine
    for attempt in range(2):
        out = str(tmp_path_factory.mktemp("ddp"))
        try:
            mp.start_processes(two_process_worker, args=(out,), nprocs=2, start_method="spawn")
            break
        except mp.ProcessRaisedException:
            if attempt:
                raise
    return out, torch.load(os.path.join(out, "rank0.pt"), weights_only=False)


def test_two_processes_train_as_one_with_update_freq_2_and_resume_after_a_stop(
    two_processes, tmp_path,
                                                                               monkeypatch):
    out, got = two_processes
    monkeypatch.setattr(train, "make_optimizer", sgd)
    # one process's Ctrl-C stopped both
    assert "stopped at step 6" in got["stopped"]
    pairs = copy_pairs()
    one, _ = train_model(tiny_model("nar"), pairs, pairs[:20],
                         TrainConfig(update_freq=2, **DDP_CFG), str(tmp_path))
    ddp = tiny_model("nar")
    ddp.load_state_dict(got["model"])
    assert same_weights(ddp, one)
    only_half, _ = train_model(tiny_model("nar"), pairs, pairs[:20], TrainConfig(**DDP_CFG),
                               str(tmp_path / "k1"))
    assert not same_weights(ddp, only_half)


def test_sharded_decoding_and_scoring_equal_one_process(two_processes):
    _, got = two_processes
    ar = tiny_model("ar", seed=3).eval()
    assert got["beam"] == translate_ids(ar, SOURCES, method="beam", beam=3, max_tokens=40)
    candidates, scores = nbest_ids(ar, SOURCES, 3, max_tokens=40)
    assert got["nbest"][0] == candidates
    assert torch.allclose(torch.tensor(got["nbest"][1]), torch.tensor(scores), atol=1e-5)
    nar = tiny_model("nar")
    nar.load_state_dict(two_processes[1]["model"])
    run = type("R", (), {"decode_tokens": 40, "device": "cpu", "precision": "fp32"})
    expected = em_nat.nar_scores(run, nar.eval(), [(s, s) for s in SOURCES])
    assert torch.allclose(torch.tensor(got["scores"]), torch.tensor(expected), atol=1e-4)


def test_two_processes_score_the_e_step_without_dropout_as_one_eval_process(two_processes):
    # Every process puts its model in eval mode before scoring its share, whatever mode it came in:
    # a model left in train mode would score its share of each source's candidates with dropout on.
    _, got = two_processes
    run = type("R", (), {"decode_tokens": 40, "device": "cpu", "precision": "fp32"})
    with torch.no_grad():
        reference = [float(dropout_nar().eval().score(torch.tensor([s]), torch.tensor([c])))
                     for s, c in SCORED_PAIRS]
    assert torch.allclose(torch.tensor(got["noisy_scores"]), torch.tensor(reference), atol=1e-5)
    scores = em_nat.candidate_nar_scores(run, dropout_nar().eval(), SOURCES, CANDIDATE_SETS)
    assert got["selected"] == em_nat.best_candidates(CANDIDATE_SETS, scores)[0]
