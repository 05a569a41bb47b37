"""Properties of model.py checked against known answers: masks, the cache, NAR independence from the
target, the length classifier, and a small learning test."""
import math
import random

import pytest
import torch

from data import collate
from decode import ar_greedy
from model import BOS, NEVER_EMITTED, PAD, ModelConfig, Transformer, additive_mask
from one_device import PretendDevice, on_the_device
from train import TrainConfig, train_model

torch.set_num_threads(2)


def tiny(kind, **kw):
    cfg = dict(vocab_size=20, kind=kind, d_model=32, n_heads=4, d_ff=64, enc_layers=2, dec_layers=2,
               dropout=0.0, max_len=16)
    cfg.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**cfg)).eval()


def random_batch(b=3, s=6, t=5, vocab=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (b, s), generator=g)
    tgt = torch.randint(4, vocab, (b, t), generator=g)
    src[0, 4:] = PAD                                           # ragged lengths
    tgt[1, 3:] = PAD
    return src, tgt


def test_encoder_ignores_padding():
    model = tiny("ar")
    src, _ = random_batch()
    enc, keep = model.encode(src)
    more_pad = torch.cat([src, torch.full((3, 4), PAD)], dim=1)
    enc2, _ = model.encode(more_pad)
    assert torch.allclose(enc[keep], enc2[:, :enc.size(1)][keep], atol=1e-5)
    changed = src.clone()
    changed[0, 4:] = 7                                         # the padding becomes real tokens:
    # now it matters
    assert not torch.allclose(model.encode(changed)[0][0, :5], enc[0, :5], atol=1e-4)


def test_ar_decoder_never_sees_the_future():
    model = tiny("ar")
    src, tgt = random_batch()
    enc, keep = model.encode(src)
    dec_in, _ = model.ar_inputs_outputs(tgt)
    logits = model.ar_logits(dec_in, enc, keep)
    future = dec_in.clone()
    future[:, 3:] = 9                                          # change positions 3.. only
    logits2 = model.ar_logits(future, enc, keep)
    assert torch.allclose(logits[:, :3], logits2[:, :3], atol=1e-5)
    assert not torch.allclose(logits[:, 3:], logits2[:, 3:], atol=1e-3)


def assert_step_logits(logits, prefixes, model, src):
    """ar_step's logits (rows, vocab) against a teacher-forced pass over each row's own prefix (one
    sentence at a time, no cache): the never-emitted tokens exactly -inf, the others finite, and the
    same distribution (logits may differ by a constant per row). prefixes: one list per row, <bos>
    first; src: one source row per row."""
    banned = torch.tensor(sorted(NEVER_EMITTED["ar"]))
    assert logits.shape == (len(prefixes), model.cfg.vocab_size)
    assert (logits[:, banned] == float("-inf")).all(), "tokens never emitted must be at -inf"
    allowed = torch.ones(model.cfg.vocab_size, dtype=torch.bool).index_fill(0, banned, False)
    assert torch.isfinite(logits[:, allowed]).all()
    with torch.no_grad():
        for row, (prefix, source) in enumerate(zip(prefixes, src)):
            enc, keep = model.encode(source[None])
            full = model.ar_logits(torch.tensor([prefix]), enc, keep)[0, -1] + model.banned
            got, expected = logits[row].log_softmax(-1), full.log_softmax(-1)
            assert torch.allclose(got[allowed], expected[allowed], atol=1e-5), (row, prefix)


@pytest.mark.exercise(3)
def test_cached_step_decoding_equals_teacher_forcing():
    # In eval mode (dropout configured but off), step by step with the cache, a batch of sentences
    # of different source lengths.
    model = tiny("ar", dropout=0.3)
    src, tgt = random_batch()
    enc, keep = model.encode(src)
    dec_in, _ = model.ar_inputs_outputs(tgt)
    cache = model.new_cache()
    with torch.no_grad():
        for i in range(dec_in.size(1)):
            logits = model.ar_step(dec_in[:, i], i, enc, keep, cache)
            assert_step_logits(logits, dec_in[:, :i + 1].tolist(), model, src)


@pytest.mark.exercise(3)
def test_cached_steps_of_beam_hypotheses_that_switch_rows_and_sentences_that_leave():
    # As beam search calls it: 2 sentences x 3 hypothesis rows (rows 0-2: sentence 0) that share
    # their sentence's encoder row; between steps the cache is reordered (hypotheses switch
    # parents, across the batch's rows) and shrunk (sentence 0 leaves the search). Every row's
    # logits must be those of its own prefix.
    model = tiny("ar", dropout=0.3)
    src = random_batch()[0][:2]
    enc, keep = model.encode(src)
    cache, sentence = model.new_cache(), [0, 0, 0, 1, 1, 1]
    prefixes = [[BOS] for _ in sentence]
    plan = [([5, 6, 7, 8, 9, 10], None), ([11, 4, 5, 6, 7, 8], [2, 0, 0, 5, 3, 4]),
            ([9, 9, 4, 12, 13, 5], [1, 2, 0, 3, 3, 4])]
    with torch.no_grad():
        for step, (tokens, rows) in enumerate(plan):
            if rows is not None:                       # the search reorders its hypotheses
                model.reorder_cache(cache, torch.tensor(rows))
                prefixes = [list(prefixes[r]) for r in rows]
            logits = model.ar_step(torch.tensor([p[-1] for p in prefixes]), step, enc, keep, cache)
            assert_step_logits(logits, prefixes, model, src[sentence])
            prefixes = [p + [t] for p, t in zip(prefixes, tokens)]
        # sentence 0 is done: only the rows of sentence 1 and its encoder row go on
        model.shrink_cache(cache, torch.tensor([3, 4, 5]), torch.tensor([1]))
        prefixes, enc, keep = prefixes[3:], enc[1:], keep[1:]
        logits = model.ar_step(torch.tensor([p[-1] for p in prefixes]), len(plan), enc, keep, cache)
        assert_step_logits(logits, prefixes, model, src[[1, 1, 1]])


class StepOnDevice(torch.Tensor):
    """A step counter that may not be read on the host (int(), .item(), .tolist(), a truth test):
    on a GPU each read is a host sync, which a CUDA graph cannot record. What is computed from it
    is a plain tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))

    def host_read(self, *args):
        raise AssertionError("ar_step read the step on the host (a sync); index with the tensor")

    item = tolist = __int__ = __index__ = __float__ = __bool__ = host_read


@pytest.mark.exercise(3)
def test_cached_steps_on_a_preallocated_cache_as_the_fast_path_calls_them():
    # decode.py's fast path (the one a GPU runs): a cache preallocated for every step
    # (new_fixed_cache), so its size says nothing of the step; the step a (1,) long tensor; the
    # encoder mask already additive. One sentence and one row: logits (1, vocab). The step is read
    # on the device: no host sync (a CUDA graph cannot record one).
    model = tiny("ar", dropout=0.3)
    src, tgt = random_batch()
    src, tgt = src[1:2], tgt[1:2]
    enc, keep = model.encode(src)
    dec_in, _ = model.ar_inputs_outputs(tgt)
    steps = dec_in.size(1) + 3
    at = torch.zeros(1, dtype=torch.long).as_subclass(StepOnDevice)
    visible = torch.zeros(1, 1, 1, steps, dtype=torch.bool)
    cache, _ = model.new_fixed_cache(1, steps, model.cross_keys_values(enc), at, visible)
    with torch.no_grad():
        for i in range(dec_in.size(1)):
            at.fill_(i)
            visible[..., i] = True
            logits = model.ar_step(dec_in[:, i], at, enc, additive_mask(keep), cache)
            assert_step_logits(logits, dec_in[:, :i + 1].tolist(), model, src)


def test_nar_decoder_output_does_not_depend_on_target_tokens():
    model = tiny("nar")
    src, tgt = random_batch()
    outputs = []
    model.decoder[-1].register_forward_hook(lambda mod, inp, out: outputs.append(out))
    other = torch.where(tgt != PAD, (tgt + 5) % 16 + 4, tgt)   # same lengths, other tokens
    model(src, tgt)
    model(src, other)
    assert not torch.equal(tgt, other)
    assert torch.equal(outputs[0], outputs[1])
    longer = tgt.clone()
    # one more token: the output must change
    longer[1, 3] = 5
    model(src, longer)
    assert not torch.allclose(outputs[0][1], outputs[2][1])


@pytest.mark.exercise(2)
def test_nar_decoder_input_is_the_position_embeddings():
    # What the first decoder layer receives: at a real position t < T the scaled position embedding
    # of t, past the length zeros; no target token (there is none at test time) and no source copy.
    model = tiny("nar")
    src, _ = random_batch()
    enc, keep = model.encode(src)
    inputs = []
    hook = model.decoder[0].register_forward_pre_hook(lambda layer, args: inputs.append(args[0]))
    model.nar_states(torch.tensor([3, 5, 1]), enc, keep)
    hook.remove()
    pos = model.tgt_pos.weight[:5].detach() * math.sqrt(model.cfg.d_model)         # (5, d)
    expected = torch.stack([pos * (torch.arange(5) < n)[:, None] for n in (3, 5, 1)])
    assert torch.allclose(inputs[0], expected, atol=1e-6)


def first_decoder_input(model, lengths, enc, keep, max_tgt_len=None):
    inputs = []
    hook = model.decoder[0].register_forward_pre_hook(lambda layer, args: inputs.append(args[0]))
    with torch.no_grad():
        model.nar_states(lengths, enc, keep, max_tgt_len)
    hook.remove()
    return inputs[0]


@pytest.mark.exercise(2)
def test_nar_decoder_input_has_dropout_in_train_mode_only():
    # Dropout p = 0.5 (cfg.dropout): in eval mode the input is exactly the masked scaled positions;
    # in train mode every entry is either dropped (0) or kept and scaled by 1 / (1 - p) = 2, about
    # half of each, and past the length everything stays 0. A batch of one, max_tgt_len past its
    # length.
    model = tiny("nar", dropout=0.5)
    src, _ = random_batch()
    with torch.no_grad():
        enc, keep = model.encode(src)
    lengths = torch.tensor([4, 6, 2])
    pos = model.tgt_pos.weight[:7].detach() * math.sqrt(model.cfg.d_model)             # (7, d)
    expected = torch.stack([pos * (torch.arange(7) < n)[:, None] for n in lengths.tolist()])
    assert torch.allclose(first_decoder_input(model, lengths, enc, keep, 7), expected, atol=1e-6)
    one = first_decoder_input(model, lengths[1:2], enc[1:2], keep[1:2])
    assert torch.allclose(one, expected[1:2, :6], atol=1e-6)
    model.train()
    torch.manual_seed(1)
    got = first_decoder_input(model, lengths, enc, keep, 7)
    dropped, kept = got == 0, torch.isclose(got, 2 * expected, atol=1e-5)
    assert (dropped | kept).all(), "in train mode every entry is dropped or scaled by 1 / (1 - p)"
    real = expected != 0
    assert 0.35 < dropped[real].float().mean() < 0.65
    assert (got[~real] == 0).all()
    assert (dropped[0, :2] != dropped[1, :2]).any(), "each sentence its own dropout"


@pytest.mark.exercise(3)
def test_cached_steps_stay_on_the_models_device():
    # Every tensor the step makes lies on the model's device, from an int step too: a step made into
    # a CPU tensor (torch.as_tensor(step) with no device) would meet the model's weights on a GPU
    # (tests/one_device.py checks it on the CPU).
    model = tiny("ar")
    with torch.no_grad():
        enc, keep = model.encode(random_batch()[0])
        cache, token = model.new_cache(), torch.full((3,), BOS)
        for step in (0, 1, torch.tensor([2])):
            with PretendDevice(model, token, enc, keep, step):
                logits = model.ar_step(token, step, enc, keep, cache)
            assert on_the_device(logits) and logits.shape == (3, 20)


@pytest.mark.exercise(2)
def test_nar_decoder_input_trains_the_positions_and_stays_on_the_models_device():
    # The position embeddings learn through the input: every row up to the longest length gets a
    # gradient, the rows past it none.
    model = tiny("nar")
    src, _ = random_batch()
    enc, keep = model.encode(src)
    out = model.nar_states(torch.tensor([3, 5, 1]), enc, keep)              # (3, 5, d)
    (out * torch.randn_like(out)).sum().backward()
    grad = model.tgt_pos.weight.grad
    assert grad is not None and grad[:5].abs().sum(1).gt(0).all() and grad[5:].eq(0).all()
    # Every tensor it makes lies on the model's device: one made on the CPU by mistake would meet
    # the model's on a GPU (tests/one_device.py checks it on the CPU).
    lengths = torch.tensor([3, 5, 1])
    for train_mode in (False, True):
        model.train(train_mode)
        with torch.no_grad(), PretendDevice(model, lengths, enc, keep):
            out = model.nar_states(lengths, enc, keep, 5)
        assert on_the_device(out) and out.shape == (3, 5, model.cfg.d_model)


@pytest.mark.exercise(1)
@pytest.mark.parametrize("eps", [0.0, 0.25])
def test_length_classifier_of_a_batch_by_hand(eps):
    # Every sentence its own logits from its own slot 0 (the length head's weights times slot 0, by
    # hand; up to a constant per sentence), in eval and in train mode alike (dropout 0.5
    # configured); the loss by hand, averaged over sentences of different lengths (the classes at
    # both ends: 0 and max_len): -(1 - eps) log p(T|x) - eps times the mean of log p(c|x) over
    # all classes. And a batch of one.
    model = tiny("nar", dropout=0.5, label_smoothing=eps)
    src, _ = random_batch()
    with torch.no_grad():
        enc, _ = model.encode(src)
    lengths = torch.tensor([0, 1, model.cfg.max_len])
    weight = model.length_head.weight.detach()
    by_hand = torch.stack([weight @ enc[row, 0] for row in range(3)])          # (3, max_len + 1)
    logp = by_hand.log_softmax(-1)
    losses = [-(1 - eps) * logp[row, lengths[row]] - eps * logp[row].mean() for row in range(3)]
    for train_mode in (False, True):
        model.train(train_mode)
        with torch.no_grad():
            logits = model.length_logits(enc)
            assert logits.shape == (3, model.cfg.max_len + 1)
            assert torch.allclose(logits.log_softmax(-1), logp, atol=1e-5)
            assert model.length_logits(enc[1:2]).shape == (1, model.cfg.max_len + 1)
            assert abs(model.length_loss(enc, lengths).item() - sum(losses).item() / 3) < 1e-5
            assert abs(model.length_loss(enc[1:2], lengths[1:2]).item() - losses[1].item()) < 1e-5
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.length_loss(enc, lengths).dtype == torch.float32


@pytest.mark.exercise(2)
def test_nar_self_attention_ignores_positions_past_the_length():
    model = tiny("nar")
    src, _ = random_batch()
    enc, keep = model.encode(src)
    lengths = torch.tensor([3, 4, 5])
    short = model.nar_logits(lengths, enc, keep, max_tgt_len=5)
    padded = model.nar_logits(lengths, enc, keep, max_tgt_len=9)
    real = torch.arange(5)[None] < lengths[:, None]
    assert torch.allclose(short[real], padded[:, :5][real], atol=1e-5)


@pytest.mark.exercise(1)
def test_the_length_loss_trains_the_length_head_and_the_encoder():
    # The NAR loss adds the length loss, so its gradients must reach the length head and, through
    # slot 0, the encoder: the same loss written out here gives the gradients to match, on the same
    # weights (a loss computed under no_grad, or from a detached slot 0, has none or the head's
    # only).
    model = tiny("nar", label_smoothing=0.1)
    src, _ = random_batch()
    lengths = torch.tensor([0, 4, model.cfg.max_len])

    def gradients(loss_of):
        model.zero_grad()
        enc, _ = model.encode(src)
        loss_of(enc).backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                for p in (model.length_head.weight, model.src_pos.weight)]

    def by_hand(enc):
        logp = model.length_head(enc[:, 0]).float().log_softmax(-1)      # (batch, max_len + 1)
        true = logp.gather(1, lengths[:, None])[:, 0]
        return (-(1 - 0.1) * true - 0.1 * logp.mean(-1)).mean()

    want = gradients(by_hand)
    got = gradients(lambda enc: model.length_loss(enc, lengths))
    assert want[1].abs().sum() > 0                                   # the encoder does get one
    for name, g, w in zip(("length head", "encoder"), got, want):
        assert torch.allclose(g, w, atol=1e-6), name


@pytest.mark.exercise(1)
def test_the_length_loss_is_float32_for_a_bf16_model():
    # "in float32": a model whose weights are bf16 still returns a float32 loss, computed from its
    # bf16 logits in float32.
    model = tiny("nar", label_smoothing=0.1).to(torch.bfloat16)
    src, _ = random_batch()
    lengths = torch.tensor([2, 4, 16])
    with torch.no_grad():
        enc, _ = model.encode(src)
        logp = model.length_logits(enc).float().log_softmax(-1)
        loss = model.length_loss(enc, lengths)
    want = (-(0.9 * logp.gather(1, lengths[:, None])[:, 0]) - 0.1 * logp.mean(-1)).mean()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want.item()) < 1e-5


@pytest.mark.exercise(1)
def test_length_classifier_loss_and_argmax_known_answer():
    # With no encoder layers, slot 0 of the encoder output is exactly its scaled position embedding,
    # so a hand-set classifier gives known logits: 5 for length 7, 0 for every other length.
    model = tiny("nar", enc_layers=0, label_smoothing=0.1)
    h0 = model.src_pos.weight[0] * math.sqrt(model.cfg.d_model)
    with torch.no_grad():
        model.length_head.weight.zero_()
        model.length_head.weight[7] = 5 * h0 / h0.dot(h0)
    src, _ = random_batch()
    enc, _ = model.encode(src)
    assert model.length_logits(enc).argmax(-1).tolist() == [7, 7, 7]
    classes = model.cfg.max_len + 1
    log_z = math.log(math.exp(5) + classes - 1)
    log_p7, log_p_other = 5 - log_z, -log_z
    for true_len, expected in [(7, None), (3, None)]:
        mean_logp = (log_p7 + (classes - 1) * log_p_other) / classes
        logp_true = log_p7 if true_len == 7 else log_p_other
        expected = -(0.9 * logp_true + 0.1 * mean_logp)
        loss = model.length_loss(enc, torch.full((3,), true_len))
        assert abs(loss.item() - expected) < 1e-5


def test_ar_learns_to_reverse_sequences(tmp_path):
    rng = random.Random(0)
    pairs = []
    for _ in range(3000):
        seq = [rng.randint(4, 13) for _ in range(rng.randint(2, 6))]
        pairs.append((seq, seq[::-1]))
    train, valid = pairs[:2800], pairs[2800:]
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=14, kind="ar", d_model=64, n_heads=4, d_ff=128,
                                    enc_layers=2, dec_layers=2, dropout=0.0, max_len=16,
                                    label_smoothing=0.0))
    # The best of two checkpoints: at this learning rate a single step can spike, and the test asks
    # whether the model learns, not what its last step happened to be.
    cfg = TrainConfig(lr=3e-3, warmup=100, max_tokens=1024, ar_steps=500, valid_every=250,
                      final_model="best")
    model, _ = train_model(model, train, valid, cfg, str(tmp_path / "reverse"))
    src, tgt = collate(valid)
    out = ar_greedy(model, src)
    exact = sum(o[:len(t)] == t and all(x == PAD for x in o[len(t):])
                for o, (_, t) in zip(out.tolist(), valid))
    assert exact / len(valid) > 0.95


def hand_nar_score(model, src, tgt, bf16=False):
    """log p(T|x) + sum_t log p(y_t|x,T), computed by hand in float32 from the model's hidden states
    (the length classifier's input and the decoder's last layer; under bf16 autocast if asked), one
    position at a time."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        enc, keep = model.encode(src)
        lengths = (tgt != PAD).sum(1)
        h = model.nar_states(lengths, enc, keep, max_tgt_len=tgt.size(1))           # (batch, t, d)
    total = []
    for row in range(src.size(0)):
        length_logp = torch.log_softmax(model.length_head.weight.float() @ enc[row, 0].float(), -1)
        score = float(length_logp[int(lengths[row])])
        for i in range(int(lengths[row])):
            logits = model.embed.weight.float() @ h[row, i].float() + model.out_bias.float()
            score += float(torch.log_softmax(logits, -1)[tgt[row, i]])
        total.append(score)
    return torch.tensor(total)


def test_nar_score_known_answer():
    # The E-step's score: the length term plus every token's log-probability, not length-normalised.
    model = tiny("nar")
    src, tgt = random_batch()
    with torch.no_grad():
        assert torch.allclose(model.score(src, tgt), hand_nar_score(model, src, tgt), atol=1e-4)


def test_scores_are_float32_under_bf16_autocast():
    # Under bf16 autocast the hidden states are bf16, but the output layer and log-softmax of a
    # score must be float32: compare with the float32 output layer applied to those same hidden
    # states.
    model = tiny("nar")
    with torch.no_grad():
        model.embed.weight.mul_(4.0)                           # sharp logits: bf16 rounding shows
    src, tgt = random_batch()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.score(src, tgt)
    with torch.no_grad():
        expected = hand_nar_score(model, src, tgt, bf16=True)
    assert torch.allclose(got, expected, atol=1e-3)
    ar = tiny("ar")
    with torch.no_grad():
        ar.embed.weight.mul_(4.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        enc, keep = ar.encode(src)
        dec_in, dec_out = ar.ar_inputs_outputs(tgt)
        h = ar.ar_states(dec_in, enc, keep)
        got = ar.score(src, tgt)
    with torch.no_grad():
        logp = torch.log_softmax(h.float() @ ar.embed.weight.float().T + ar.out_bias.float(), -1)
        expected = logp.gather(-1, dec_out[..., None]).squeeze(-1).masked_fill(
            dec_out == PAD, 0).sum(1)
    assert torch.allclose(got, expected, atol=1e-3)
