"""The GPU path, checked in one command: `python -m pytest tests/test_devices.py`.

Every test that takes `device` runs on each device present: the CPU always, CUDA and Apple MPS where
available (skipped with the reason otherwise). On a device the models run in the precision em-nat
picks for it (model.resolve_precision: bf16 autocast on a GPU with native bf16, else fp32) and are
compared with fp32 on the CPU. The rest checks, on the CPU, what decides a run's behaviour on GPUs:
models leave training in eval mode, scoring is never done with dropout on, precision and device
choice, the E-step's host memory, and evaluation settings that must not crash."""
import os
import random
import types

import numpy as np
import pytest
import torch

import em_nat
import report
import train
from decode import (NBest, ar_beam_search, ar_greedy, fast_beam_search, fast_greedy,
                    fast_nar_decode, nar_decode, nbest, score_pairs)
from model import ModelConfig, Transformer, full_precision, precision_context, resolve_precision
from test_robustness import StopAfter
from train import TrainConfig, train_model

torch.set_num_threads(2)


def available(name):
    if name == "cuda":
        return torch.cuda.is_available(), "no CUDA device"
    if name == "mps":
        return torch.backends.mps.is_available(), "no Apple MPS device"
    return True, ""


@pytest.fixture(params=["cpu", "cuda", "mps"])
def device(request):
    ok, why = available(request.param)
    if not ok:
        pytest.skip(why)
    return request.param


def tiny(kind, seed=0, dropout=0.0, vocab_size=20, max_len=16):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab_size, kind=kind, d_model=32, n_heads=4, d_ff=64,
                                   enc_layers=1, dec_layers=1, dropout=dropout, max_len=max_len))


def copy_pairs(n=200, seed=0):
    rng = random.Random(seed)
    return [(s, s[::-1]) for s in ([rng.randint(4, 19) for _ in range(rng.randint(2, 8))]
                                   for _ in range(n))]


# ----- on every device present
# ---------------------------------------------------------------------
def test_decoders_and_scores_agree_with_fp32_on_the_cpu(device):
    # Tolerances: fp32 devices must agree to rounding (1e-3 nats a sentence); under bf16 the hidden
    # states are rounded to 8 bits of mantissa, so a sentence's score may move by up to 0.5 nats and
    # a few decoded tokens may differ (at most 10% here), while scores stay float32 at the output
    # layer.
    precision = resolve_precision("auto", device)
    atol, token_share = (1e-3, 1.0) if precision == "fp32" else (0.5, 0.9)
    ar, nar = tiny("ar", seed=1).eval(), tiny("nar", seed=2).eval()
    sources = torch.randint(4, 20, (6, 7), generator=torch.Generator().manual_seed(0))
    on_cpu = decode_all(ar, nar, sources, "cpu", "fp32")
    on_device = decode_all(ar.to(device), nar.to(device), sources.to(device), device, precision)
    for name in ("beam", "nar", "npd"):
        same = (on_cpu[name] == on_device[name].cpu()).float().mean()
        assert same >= token_share, (name, float(same))
    for name in ("ar_score", "nar_score"):
        assert on_device[name].dtype == torch.float32
        assert torch.allclose(on_cpu[name], on_device[name].cpu(), atol=atol, rtol=0), name


@torch.no_grad()
def decode_all(ar, nar, src, device, precision):
    with precision_context(device, precision):
        beam, _ = ar_beam_search(ar, src, beam=4)
        return {"beam": beam[:, 0], "nar": nar_decode(nar, src),
                "npd": nar_decode(nar, src, length_beam=5, rescorer=ar),
                "ar_score": ar.score(src, src), "nar_score": nar.score(src, src)}


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_the_fast_path_decodes_as_the_reference_decoders_on_the_device(device, precision):
    """The fast path (on CUDA: CUDA graphs replayed, recorded under bf16 autocast where em-nat
    uses it) against the reference decoders on the same device and precision: equal tokens in fp32
    (scores to rounding), nearly all tokens under bf16. A second batch of the same shapes replays
    the graphs recorded for the first."""
    precision = resolve_precision(precision, device)
    token_share, atol = (1.0, 1e-4) if precision == "fp32" else (0.9, 0.05)
    ar, nar = tiny("ar", seed=1).to(device).eval(), tiny("nar", seed=2).to(device).eval()
    for seed in (0, 1):
        src = torch.randint(4, 20, (6, 7), generator=torch.Generator().manual_seed(seed)).to(device)
        with torch.no_grad(), precision_context(device, precision):
            pairs = [(ar_greedy(ar, src), fast_greedy(ar, src)),
                     (nar_decode(nar, src, length_beam=5, rescorer=ar),
                      fast_nar_decode(nar, src, length_beam=5, rescorer=ar))]
            (beam, beam_scores), (fast, fast_scores) = (ar_beam_search(ar, src, beam=4, nbest=4),
                                                        fast_beam_search(ar, src, beam=4, nbest=4))
        pairs.append((beam, fast[..., :beam.size(-1)]))
        for want, got in pairs:
            got = torch.nn.functional.pad(got, (0, max(want.size(-1) - got.size(-1), 0)))
            same = (want == got[..., :want.size(-1)]).float().mean()
            assert same >= token_share, float(same)
        assert torch.allclose(beam_scores, fast_scores, atol=atol, rtol=0)


def test_a_stopped_loop_resumes_on_the_device(device, tmp_path, monkeypatch):
    precision = resolve_precision("auto", device)
    pairs, valid = copy_pairs(), copy_pairs(30, seed=1)
    cfg = TrainConfig(lr=2e-3, warmup=5, max_tokens=128, ar_steps=24, valid_every=10, device=device,
                      precision=precision)
    straight, _ = train_model(tiny("ar", dropout=0.1).to(device), pairs, valid, cfg,
                              str(tmp_path / "straight"))

    class FakeInterrupt:
        def __enter__(self):
            return StopAfter(13)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(train, "graceful_interrupt", FakeInterrupt)
    with pytest.raises(train.Stopped, match="stopped at step 13"):
        train_model(tiny("ar", dropout=0.1).to(device), pairs, valid, cfg,
                    str(tmp_path / "resumed"))
    monkeypatch.undo()
    resumed, _ = train_model(tiny("ar", seed=9, dropout=0.1).to(device), pairs, valid, cfg,
                             str(tmp_path / "resumed"))
    # GPU kernels may sum in another order
    atol = 1e-5 if device == "cpu" else 1e-3
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=atol), name


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_gpus_train_as_one_with_nccl(tmp_path):
    import torch.multiprocessing as mp
    mp.start_processes(nccl_worker, args=(str(tmp_path),), nprocs=2, start_method="spawn")
    pairs = copy_pairs()
    cfg = TrainConfig(lr=0.3, warmup=4, max_tokens=64, nar_steps=8, valid_every=4, update_freq=2,
                      device="cuda:0", precision="fp32")
    one, _ = train_model(tiny("nar").to("cuda:0"), pairs, pairs[:20], cfg, str(tmp_path / "one"))
    two = torch.load(os.path.join(tmp_path, "ddp", "model.pt"))
    for (name, a), b in zip(one.state_dict().items(), two.values()):
        assert torch.allclose(a.cpu(), b, atol=1e-4), name


def nccl_worker(rank, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("nccl", rank=rank, world_size=2)
    torch.cuda.set_device(rank)
    cfg = TrainConfig(lr=0.3, warmup=4, max_tokens=64, nar_steps=8, valid_every=4,
                      device=f"cuda:{rank}", precision="fp32")
    train_model(tiny("nar").to(f"cuda:{rank}"), copy_pairs(), copy_pairs()[:20], cfg,
                os.path.join(out, "ddp"))
    torch.distributed.destroy_process_group()


# ----- what decides a run's behaviour on GPUs, checked on the CPU
# -----------------------------------
def test_a_trained_model_comes_back_in_eval_mode(tmp_path):
    for final_model in ("last", "best"):
        cfg = TrainConfig(lr=1e-3, warmup=5, max_tokens=128, ar_steps=6, valid_every=3,
                          final_model=final_model)
        model, _ = train_model(tiny("ar", dropout=0.3), copy_pairs(), copy_pairs(20, 1), cfg,
                               str(tmp_path / final_model))
        assert not model.training and not any(m.training for m in model.modules()), final_model


def test_scoring_and_decoding_switch_dropout_off_themselves():
    nar, ar = tiny("nar", dropout=0.3).train(), tiny("ar", dropout=0.3, seed=1).train()
    pairs = [(s, t) for s, t in copy_pairs(30)]
    scored = score_pairs(nar, pairs, max_tokens=64)
    assert not nar.training
    with torch.no_grad():
        reference = [float(nar.score(torch.tensor([s]), torch.tensor([t]))) for s, t in pairs]
    assert np.allclose(scored, reference, atol=1e-4)
    nar.train()
    run = types.SimpleNamespace(decode_tokens=64, device="cpu", precision="fp32")
    sets = [[t, t[::-1], t[:1]] for _, t in pairs]
    sources = [s for s, _ in pairs]
    selected, _ = em_nat.best_candidates(sets, em_nat.candidate_nar_scores(run, nar, sources, sets))
    assert selected == em_nat.best_candidates(
        sets, em_nat.candidate_nar_scores(run, nar.eval(), sources, sets))[0]
    ar.train()
    first = nbest(ar, [s for s, _ in pairs[:5]], 3, max_tokens=64).lists()
    # no dropout noise
    assert first == nbest(ar, [s for s, _ in pairs[:5]], 3, max_tokens=64).lists()


def test_precision_fits_the_device(monkeypatch):
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("auto", "mps") == "fp32"
    with pytest.raises(ValueError, match="bf16 needs a CUDA device"):
        resolve_precision("bf16", "cpu")
    for capability, expected in (((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"),
                                 ((9, 0), "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability",
                            lambda device=None, c=capability: c)
        assert resolve_precision("auto", "cuda:0") == expected, capability      # V100/T4: fp32
    assert resolve_precision("fp32", "cuda") == "fp32"
    # No autocast object at all where a run does not autocast (older torch refuses one for MPS).
    assert not isinstance(precision_context("mps", "fp32"), torch.autocast)
    assert not isinstance(full_precision("mps"), torch.autocast)
    assert isinstance(precision_context("cuda", "bf16"), torch.autocast)


def test_each_torchrun_process_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setattr(train, "distributed", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert train.process_device("cuda:0") == "cuda:3" and train.process_device("cuda") == "cuda:3"
    assert train.process_device("cpu") == "cpu"


def test_the_run_records_its_precision(tmp_path):
    cfg = em_nat.run_config(em_nat.build_parser().parse_args(["--out", str(tmp_path), "--device",
                                                              "cpu", "--toy-train-size", "50"]))
    em_nat.Run(cfg)
    assert '"precision": "fp32"' in (tmp_path / "run.json").read_text()


def test_a_beam_wider_than_the_output_space_adds_nothing_to_q():
    # A 1-word vocabulary and outputs of at most 1 token: two real hypotheses ("" and "w"); a beam
    # of 5 pads its list with -inf entries, which must never enter Q, even with no margin.
    ar = tiny("ar", vocab_size=5, max_len=1).eval()
    result = nbest(ar, [[4]], 5)
    real = [c for c, s in zip(result.candidates(0), result.scores[0].tolist()) if s > float("-inf")]
    assert len(real) == 2
    q = em_nat.quality_constrained_set(result.candidates(0), result.scores[0].tolist(), None)
    assert q == real


def test_compact_nbest_round_trip_and_interleave(tmp_path):
    ar = tiny("ar", seed=3).eval()
    sources = [s for s, _ in copy_pairs(11, seed=2)]
    whole = nbest(ar, sources, 3, max_tokens=40)
    candidates, scores = whole.lists()
    assert NBest.from_lists(3, candidates, scores).lists() == (candidates, scores)
    # train.shard's order
    shards = NBest.interleave([nbest(ar, sources[r::2], 3, max_tokens=40) for r in range(2)])
    assert shards.lists()[0] == candidates and np.allclose(shards.scores, whole.scores, atol=1e-5)
    assert whole.tokens.dtype == np.int32 and whole.tokens.nbytes == 4 * sum(
        len(c) for cs in candidates for c in cs)
    cfg = em_nat.run_config(em_nat.build_parser().parse_args(["--out", str(tmp_path), "--device",
                                                              "cpu", "--toy-train-size", "50",
                                                              "--candidates", "3"]))
    run = em_nat.Run(cfg)
    run.write_nbest(str(tmp_path / "candidates.tgt"), whole)
    back = run.read_nbest(str(tmp_path / "candidates.tgt"))
    assert back.lists()[0] == candidates and np.allclose(back.scores, whole.scores, atol=1e-6)


def test_evaluation_with_no_timed_sentences_and_a_sampled_entropy():
    corpus = em_nat.make_toy_corpus(seed=1, train_size=30)
    test = report.TestSet(corpus, "test", 64, 256, "cpu")
    vocab = len(corpus.vocab)
    result, outputs = report.evaluate_nar(tiny("nar", vocab_size=vocab, max_len=64).eval(),
                                          tiny("ar", vocab_size=vocab, max_len=64).eval(), test,
                                          beam=2, alpha=1.0, length_beam=3, speed_sentences=0)
    assert result["speedup"] is None and len(outputs["ODD"]) == len(corpus.test)
    pairs = list(range(100))
    sample = report.entropy_sample(pairs, 10)
    assert len(sample) == 10 and sample == report.entropy_sample(pairs, 10)
    assert sample == sorted(sample)
    assert report.entropy_sample(pairs, 100) == pairs
