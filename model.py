"""model.py: the two models that the EM loop alternates between (docs/method.md).

One compact encoder-decoder Transformer with two kinds of decoder:

- kind "ar":  p_AR(y|x)  = prod_t p(y_t | y_<t, x)         causal self-attention, teacher forcing
              for training, a key/value cache for step-by-step decoding (decode.py's beam search).
- kind "nar": p_NAR(y|x) = p(T|x) * prod_t p(y_t | x, T)   no causal mask, no target tokens as
              input: the decoder sees only position embeddings over a placeholder (zero) input, and
              a length classifier on the encoder predicts T.

Both follow the layout of the official code (models/nat_modeling.py):
- one embedding matrix for source, target and output layer (joint vocabulary) plus an output bias;
- learned position embeddings, scaled like the token embeddings;
- the source is shifted right by one slot: slot 0 holds no token (a zero vector plus its position)
  and acts as a summary slot, from which the NAR model predicts the target length;
- post-layer-norm blocks; the NAR decoder has one layer more than configured;
- loss = label-smoothed token cross-entropy averaged over target tokens (+ 0.1 x length loss for
  NAR).
Where they depart from it (docs/method.md, "Where em-nat departs from the official code"): dropout
only on the embeddings and on each sub-layer's output (none on attention weights or the ReLU
output); separate position tables for encoder and decoder; no LayerNorm on the embeddings; no
source-language bias; and NAR targets carry no <EOS>: the official code puts <EOS> at the last
decoder input slot and predicts it there, which teaches nothing the padding mask does not already
say; here the length class T is simply the number of target tokens.

Run `python -m pytest tests/test_model.py` to see the properties this file promises.
"""
import ctypes
import json
import math
import os
import sys
from contextlib import nullcontext
from collections import Counter
from dataclasses import dataclass, asdict, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
try:
    from torch.nn.attention import SDPBackend, sdpa_kernel        # torch >= 2.3
except ImportError:
    SDPBackend = sdpa_kernel = None
from tqdm import tqdm

# Special token ids, in the official code's order.
PAD, EOS, UNK, BOS = 0, 1, 2, 3
SPECIALS = ["<pad>", "<eos>", "<unk>", "<bos>"]
# Tokens a decoder never emits as text. The AR model may emit <eos> (it ends the output); the NAR
# model may not (its length is chosen by the length classifier). Scoring a *given* target masks
# nothing.
NEVER_EMITTED = {"ar": (PAD, BOS, UNK), "nar": (PAD, EOS, BOS, UNK)}


@dataclass
class ModelConfig:
    vocab_size: int = 0
    kind: str = "ar"              # "ar" (autoregressive) or "nar" (non-autoregressive)
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    enc_layers: int = 5
    dec_layers: int = 5           # the NAR decoder gets one more (official nat_modeling.py)
    dropout: float = 0.1
    max_len: int = 256            # longest source or target in tokens: positions and length classes
    label_smoothing: float = 0.1
    length_loss_weight: float = 0.1

    def to_dict(self):
        return asdict(self)


# Named sizes. "iwslt" is the paper's IWSLT14 model (transformer_small); dropout 0.3 is the usual
# IWSLT14 value (fairseq's transformer_iwslt_de_en), as the paper does not state one.
PRESETS = {
    "toy": dict(d_model=64, n_heads=4, d_ff=256, enc_layers=2, dec_layers=2, dropout=0.1,
                max_len=64),
    "small": dict(d_model=256, n_heads=4, d_ff=1024, enc_layers=3, dec_layers=3, dropout=0.2,
                  max_len=128),
    "iwslt": dict(d_model=256, n_heads=4, d_ff=1024, enc_layers=5, dec_layers=5, dropout=0.3,
                  max_len=256),
    "base": dict(d_model=512, n_heads=8, d_ff=2048, enc_layers=6, dec_layers=6, dropout=0.1,
                 max_len=256),
}


def model_config(preset, vocab_size, kind, **overrides):
    """The ModelConfig of a named preset, for a vocabulary size and a decoder kind."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(vocab_size=vocab_size, kind=kind, **{**PRESETS[preset], **overrides})


class Attention(nn.Module):
    """Multi-head attention with F.scaled_dot_product_attention and an optional key/value cache."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def split_heads(self, x):  # (batch, len, d_model) -> (batch, heads, len, d_head)
        b, t, d = x.shape
        return x.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2)

    def keys_values(self, memory):  # (batch, len, d_model) -> two (batch, heads, len, d_head)
        k, v = self.kv_proj(memory).chunk(2, dim=-1)
        return self.split_heads(k), self.split_heads(v)

    def forward(self, x, memory, mask=None, causal=False, cache=None, cache_is_static=False):
        """x: (batch, q_len, d) queries; memory: (batch, k_len, d) keys/values source.
        mask: bool, broadcastable to (batch, heads, q_len, k_len), True = may attend.
        cache: dict holding this layer's "k"/"v"; self-attention appends the new step to it,
        cross-attention (cache_is_static) computes the encoder's keys/values once and reuses
        them."""
        q = self.split_heads(self.q_proj(x))                      # (rows, heads, q_len, d_head)
        if cache is not None and cache_is_static and "k" in cache:
            k, v = cache["k"], cache["v"]
        elif cache is not None and "at" in cache:
            # A fixed-size cache (decode.py's fast path): this step's keys and values are written in
            # place at position cache["at"] and the query sees the positions written so far. Every
            # step then has the same shapes, which a CUDA graph needs.
            k, v = self.keys_values(memory)
            cache["k"].index_copy_(2, cache["at"], k)
            cache["v"].index_copy_(2, cache["at"], v)
            k, v, mask = cache["k"], cache["v"], cache["visible"]
        else:
            k, v = self.keys_values(memory)
            if cache is not None:
                if not cache_is_static and "k" in cache:
                    k = torch.cat([cache["k"], k], dim=2)          # (batch, heads, steps, d_head)
                    v = torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        rows, h, t, dh = q.shape
        if k.size(0) != rows:
            # Beam search: the `group` hypotheses of one sentence (consecutive rows) attend to that
            # sentence's encoder keys/values, held once: their queries are stacked along q_len.
            group = rows // k.size(0)
            q = q.view(k.size(0), group, h, t, dh).transpose(1, 2).reshape(
                k.size(0), h, group * t, dh)
        # With a cache the single query may see every cached step: no causal mask needed (and SDPA's
        # is_causal would wrongly align the query with key 0).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             is_causal=causal and cache is None)
        if k.size(0) != rows:
            out = out.view(k.size(0), h, group, t, dh).transpose(1, 2).reshape(rows, h, t, dh)
        return self.out_proj(out.transpose(1, 2).reshape(rows, t, h * dh))


class FeedForward(nn.Sequential):
    def __init__(self, d_model, d_ff):
        super().__init__(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))


class EncoderLayer(nn.Module):
    """Post-layer-norm block: x = LN(x + Drop(SelfAttn(x))); x = LN(x + Drop(FFN(x)))."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.n_heads)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff)
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask):
        x = self.norm1(x + self.drop(self.self_attn(x, x, mask)))
        return self.norm2(x + self.drop(self.ffn(x)))


class DecoderLayer(nn.Module):
    """Self-attention (causal for AR, padding-masked for NAR), encoder attention, feed-forward."""

    def __init__(self, cfg):
        super().__init__()
        self.self_attn = Attention(cfg.d_model, cfg.n_heads)
        self.cross_attn = Attention(cfg.d_model, cfg.n_heads)
        self.ffn = FeedForward(cfg.d_model, cfg.d_ff)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(cfg.d_model) for _ in range(3))
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, enc, enc_mask, self_mask=None, causal=False, cache=None):
        self_cache = cache["self"] if cache is not None else None
        cross_cache = cache["cross"] if cache is not None else None
        x = self.norm1(x + self.drop(self.self_attn(x, x, self_mask, causal=causal,
                                                    cache=self_cache)))
        x = self.norm2(x + self.drop(self.cross_attn(x, enc, enc_mask, cache=cross_cache,
                                                     cache_is_static=True)))
        return self.norm3(x + self.drop(self.ffn(x)))


def padding_mask(lengths, max_len):
    """(batch,) lengths -> (batch, max_len) bool, True at real positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def attention_mask(keep):
    """(batch, k_len) -> (batch, 1, 1, k_len): every query may attend to the real keys only, as an
    additive mask (0 or -inf) built once and shared by every layer (attention would otherwise
    convert a bool mask again in each layer). keep: bool, True = a real key; or already additive."""
    return (additive_mask(keep) if keep.dtype == torch.bool else keep)[:, None, None, :]


def additive_mask(keep):
    """(rows, len) bool, True = may attend -> the same mask as float 0 / -inf."""
    return torch.zeros(keep.shape, device=keep.device).masked_fill_(~keep, float("-inf"))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.kind not in ("ar", "nar"):
            raise ValueError(f"model kind must be 'ar' or 'nar', not {cfg.kind!r}")
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)                # shared: source, target, output
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.src_pos = nn.Embedding(cfg.max_len + 1, d)             # +1: the summary slot 0
        self.tgt_pos = nn.Embedding(cfg.max_len + 1, d)             # +1: AR's <bos> / <eos> step
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        n_dec = cfg.dec_layers + (1 if cfg.kind == "nar" else 0)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(n_dec))
        self.drop = nn.Dropout(cfg.dropout)
        # Additive mask over the vocabulary (0 or -inf) for decoding: a buffer on the model's
        # device, so masking is one addition with no host-to-device copy per step. Not saved in
        # checkpoints.
        banned = torch.zeros(cfg.vocab_size)
        banned[[i for i in NEVER_EMITTED[cfg.kind] if i < cfg.vocab_size]] = float("-inf")
        self.register_buffer("banned", banned, persistent=False)
        if cfg.kind == "nar":
            # Length classes 0..max_len; logits = W h_0 from the summary slot (official
            # nat_modeling.py).
            self.length_head = nn.Linear(d, cfg.max_len + 1, bias=False)
        for emb in (self.embed, self.src_pos, self.tgt_pos):
            nn.init.normal_(emb.weight, std=d ** -0.5)               # x sqrt(d) below: unit scale

    # ----- shared pieces -------------------------------------------------------------------------
    def embed_scaled(self, tokens):  # (batch, len) -> (batch, len, d)
        return self.embed(tokens) * math.sqrt(self.cfg.d_model)

    def output_logits(self, h, banned=False):
        """(batch, len, d) -> (batch, len, vocab), tied to the embedding. banned=True: the tokens
        this kind never emits get -inf, folded into the bias (a (vocab,) addition, not a
        (rows, vocab) one)."""
        return F.linear(h, self.embed.weight,
                        self.out_bias + self.banned if banned else self.out_bias)

    def decoding_log_probs(self, logits):
        """Log-probabilities that decoders search over: the special tokens this kind never emits are
        masked out. (..., vocab) -> float32 (..., vocab)."""
        return (logits.float() + self.banned).log_softmax(-1)

    def scoring_log_probs(self, h):
        """Log-probabilities for scoring given targets (E-step selection, NPD rescoring): the output
        layer and log-softmax in float32 even under bf16 autocast (bf16 logits shift a sentence's
        score by ~0.1 nats, enough to flip a selection), and no token masked, so a target that holds
        <unk> gets its real probability. h: (..., d) -> float32 (..., vocab)."""
        with full_precision(h.device.type):
            return F.linear(h.float(), self.embed.weight.float(),
                            self.out_bias.float()).log_softmax(-1)

    def encode(self, src):
        """src: (batch, src_len) token ids, right-padded with PAD.
        Returns enc (batch, src_len + 1, d) and its key mask (batch, src_len + 1), slot 0 first."""
        b, s = src.shape
        if s + 1 > self.src_pos.num_embeddings:
            raise ValueError(f"source of {s} tokens is longer than the model's max_len "
                             f"{self.cfg.max_len}")
        tokens = self.embed_scaled(src)                                     # (batch, src_len, d)
        x = torch.cat([tokens.new_zeros(b, 1, self.cfg.d_model), tokens], dim=1)
        pos = torch.arange(s + 1, device=src.device)
        x = self.drop(x + self.src_pos(pos) * math.sqrt(self.cfg.d_model))  # (batch, src_len+1, d)
        keep = torch.cat([src.new_ones(b, 1, dtype=torch.bool), src != PAD], dim=1)
        mask = attention_mask(keep)
        for layer in self.encoder:
            x = layer(x, mask)
        return x, keep

    # ----- AR decoder ----------------------------------------------------------------------------
    def ar_inputs_outputs(self, tgt):
        """Teacher forcing: inputs <bos> y_1..y_n, outputs y_1..y_n <eos> (batch, tgt_len + 1)."""
        lengths = (tgt != PAD).sum(1)
        dec_in = F.pad(tgt, (1, 0), value=BOS)
        dec_out = F.pad(tgt, (0, 1), value=PAD).scatter(1, lengths[:, None], EOS)
        return dec_in, dec_out

    def ar_logits(self, dec_in, enc, enc_keep):
        """Full teacher-forced pass. dec_in: (batch, t) -> logits (batch, t, vocab)."""
        return self.output_logits(self.ar_states(dec_in, enc, enc_keep))

    def ar_states(self, dec_in, enc, enc_keep):
        """The decoder's last hidden states of a teacher-forced pass: (batch, t) ->
        (batch, t, d)."""
        t = dec_in.size(1)
        pos = torch.arange(t, device=dec_in.device)
        x = self.drop(self.embed_scaled(dec_in) + self.tgt_pos(pos) * math.sqrt(self.cfg.d_model))
        # Causal masking alone suffices: targets are right-padded, so no real position sees padding.
        enc_mask = attention_mask(enc_keep)
        for layer in self.decoder:
            x = layer(x, enc, enc_mask, causal=True)
        return x

    def new_cache(self):
        """Per-layer key/value cache for step-by-step AR decoding."""
        return [{"self": {}, "cross": {}} for _ in self.decoder]

    def ar_step(self, token, step, enc, enc_keep, cache):
        """One decoding step. token: (rows,) the last output of every row (<bos> at step 0);
        step: its position, an int or a (1,) long tensor on the model's device (decode.py's fast
        path counts steps on the device); the position comes from `step` alone, never from the
        cache's size (the fast path's cache is preallocated for every step: new_fixed_cache).
        Every tensor it makes lies on the model's device, also from an int step.
        enc, enc_keep: one row per sentence, shared by rows / sentences consecutive hypothesis rows
        each (beam search), never copied per row; enc_keep is bool (True = a real token) or the
        same mask already additive (additive_mask; attention_mask takes either).
        Returns logits (rows, vocab) for the next token (any constant per row aside), the
        never-emitted tokens at -inf: in eval mode the distribution that the teacher-forced pass
        (ar_logits) gives after the same prefix.
        `cache` grows by one step: its self-attention keys/values hold one row per hypothesis
        (what reorder_cache moves), its cross-attention ones one row per sentence (what
        shrink_cache selects when sentences leave the search)."""
        # >>> exercise 3: the cached AR decoding step
        pos = self.tgt_pos.weight[step] * math.sqrt(self.cfg.d_model)
        x = self.embed_scaled(token[:, None]) + pos                      # (batch, 1, d)
        enc_mask = attention_mask(enc_keep)
        for layer, layer_cache in zip(self.decoder, cache):
            x = layer(x, enc, enc_mask, cache=layer_cache)
        return self.output_logits(x, banned=True)[:, 0]
        # <<< exercise 3

    def new_fixed_cache(self, rows, steps, cross, at, visible):
        """A key/value cache of fixed size for decode.py's fast path: every decoder layer's
        self-attention keys and values of `rows` hypotheses for `steps` positions, preallocated in
        one tensor (layers, 2, rows, heads, steps, d_head), and each layer's cross-attention keys
        and values `cross` (a list of (k, v), computed once per batch). at: (1,) long, the step
        being decoded; visible: (1, 1, 1, steps) bool, the positions written so far (the caller
        updates both). ar_step reads and writes it like the growing cache of new_cache. Returns (the
        per-layer cache, the whole self-attention tensor)."""
        k0 = cross[0][0]
        h, d_head = self.cfg.n_heads, self.cfg.d_model // self.cfg.n_heads
        kv = k0.new_zeros(len(self.decoder), 2, rows, h, steps, d_head)
        cache = [{"self": {"k": kv[i, 0], "v": kv[i, 1], "at": at, "visible": visible},
                  "cross": {"k": k, "v": v}} for i, (k, v) in enumerate(cross)]
        return cache, kv

    def cross_keys_values(self, enc):
        """Every decoder layer's encoder-attention keys and values: (k, v) per layer."""
        return [layer.cross_attn.keys_values(enc) for layer in self.decoder]

    @staticmethod
    def reorder_cache(cache, index):
        """Beam search: keep the self-attention cache rows of the surviving hypotheses.
        index: (batch * beam,) rows to keep. Cross-attention caches are identical across the beams
        of one sentence and a beam only ever inherits from its own sentence, so they stay as they
        are."""
        for layer_cache in cache:
            for key in ("k", "v"):
                layer_cache["self"][key] = layer_cache["self"][key].index_select(0, index)

    @staticmethod
    def shrink_cache(cache, hypotheses, sentences):
        """Beam search: keep only the self-attention rows `hypotheses` and the cross-attention rows
        `sentences` (one per sentence) of every layer: drops the sentences whose search has
        ended."""
        for layer_cache in cache:
            for part, rows in (("self", hypotheses), ("cross", sentences)):
                for key in ("k", "v"):
                    layer_cache[part][key] = layer_cache[part][key].index_select(0, rows)

    # ----- NAR decoder ---------------------------------------------------------------------------
    def length_logits(self, enc):
        """(batch, src_len+1, d) -> (batch, max_len+1) logits over target lengths 0..max_len
        (any constant per sentence aside): the length head applied to slot 0 of each sentence's
        encoder output, no other slot, and no dropout of its own (the same logits in train and
        eval mode)."""
        # >>> exercise 1: the length classifier and its loss
        return self.length_head(enc[:, 0])
        # <<< exercise 1

    def nar_logits(self, lengths, enc, enc_keep, max_tgt_len=None):
        """All target positions at once. lengths: (batch,) target lengths T -> (batch, t, vocab)."""
        return self.output_logits(self.nar_states(lengths, enc, enc_keep, max_tgt_len))

    def nar_states(self, lengths, enc, enc_keep, max_tgt_len=None):
        """The NAR decoder's last hidden states (batch, t, d), t = max_tgt_len or the longest
        length. Its input holds no target token: a zero placeholder plus position embeddings, so
        the output cannot depend on the target. At a real position i < T of a sentence of length
        T, the position embedding of i (tgt_pos) scaled by sqrt(d) like the token embeddings;
        past T, zeros; then dropout (self.drop: in train mode only, each entry of the batch on its
        own). The position embeddings learn through this input (nothing detached), and every
        tensor it makes lies on the device of `lengths` (the model's)."""
        t = int(lengths.max()) if max_tgt_len is None else max_tgt_len
        keep = padding_mask(lengths, t)                                   # (batch, t)
        # >>> exercise 2: the NAR decoder's input
        pos = self.tgt_pos(torch.arange(t, device=lengths.device)) * math.sqrt(self.cfg.d_model)
        x = self.drop(pos[None].expand(lengths.size(0), t, -1) * keep[..., None])  # (batch, t, d)
        # <<< exercise 2
        enc_mask, self_mask = attention_mask(enc_keep), attention_mask(keep)
        for layer in self.decoder:
            x = layer(x, enc, enc_mask, self_mask=self_mask)
        return x

    # ----- losses and scores ---------------------------------------------------------------------
    def forward(self, src, tgt, normalizers=None):
        """Training loss for a batch. src: (batch, src_len), tgt: (batch, tgt_len), PAD-padded.
        Returns (loss averaged over target tokens, number of target tokens). The NAR loss adds the
        length loss, averaged over sentences. normalizers: (target tokens, sentences) to divide the
        summed losses by instead of this batch's own counts (target_counts): when an update spans
        several batches (gradient accumulation, several devices), each batch's loss is its share of
        the whole update's average."""
        enc, enc_keep = self.encode(src)
        eps = self.cfg.label_smoothing
        if self.cfg.kind == "ar":
            dec_in, dec_out = self.ar_inputs_outputs(tgt)
            logits = self.ar_logits(dec_in, enc, enc_keep)                # (batch, t+1, vocab)
            n_tokens = (dec_out != PAD).sum()
            loss = F.cross_entropy(logits.flatten(0, 1).float(), dec_out.flatten(),
                                   ignore_index=PAD, label_smoothing=eps, reduction="sum")
            return loss / (n_tokens if normalizers is None else normalizers[0]), n_tokens
        lengths = (tgt != PAD).sum(1)                                     # (batch,)
        # (batch, t, vocab)
        logits = self.nar_logits(lengths, enc, enc_keep, max_tgt_len=tgt.size(1))
        n_tokens = lengths.sum()
        token_loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=PAD,
                                     label_smoothing=eps, reduction="sum")
        if normalizers is None:
            return (token_loss / n_tokens
                    + self.cfg.length_loss_weight * self.length_loss(enc, lengths)), n_tokens
        # mean -> sum -> share
        length_loss = self.length_loss(enc, lengths) * lengths.size(0) / normalizers[1]
        return token_loss / normalizers[0] + self.cfg.length_loss_weight * length_loss, n_tokens

    def target_counts(self, tgt):
        """(target tokens, sentences) of a batch, as forward counts them (the AR model also predicts
        <eos>): the denominators of its loss. A float tensor (2,) on tgt's device (no host sync)."""
        eos = tgt.size(0) if self.cfg.kind == "ar" else 0
        return torch.stack([(tgt != PAD).sum() + eos, tgt.new_tensor(tgt.size(0))]).float()

    def length_loss(self, enc, lengths):
        """Label-smoothed cross-entropy of the true target lengths (batch,) under the length
        classifier, averaged over the sentences, in float32: per sentence -(1 - eps) log p(T|x)
        - eps * the mean of log p(c|x) over all max_len+1 classes c (the true one included),
        eps = cfg.label_smoothing (as F.cross_entropy's label_smoothing). The NAR loss adds it, so
        its gradient trains the length head and, through slot 0, the encoder: nothing detached."""
        # >>> exercise 1: the length classifier and its loss
        return F.cross_entropy(self.length_logits(enc).float(), lengths,
                               label_smoothing=self.cfg.label_smoothing)
        # <<< exercise 1

    @torch.no_grad()
    def score(self, src, tgt):
        """Sentence log-likelihoods (batch,) of given targets, no label smoothing, summed over
        tokens, output layer in float32, no token masked (scoring_log_probs).
        AR:  log p(y <eos> | x)                        (NPD rescoring of NAR candidates)
        NAR: log p(T|x) + sum_t log p(y_t | x, T)      (the E-step's selection score, as the
             official score_nat.py computes it: the length term included, not length-normalised),
             each sentence with its own length T and its own length distribution; the PAD
             positions of a shorter target add nothing."""
        enc, enc_keep = self.encode(src)
        if self.cfg.kind == "ar":
            dec_in, dec_out = self.ar_inputs_outputs(tgt)
            # (batch, t+1, vocab)
            logp = self.scoring_log_probs(self.ar_states(dec_in, enc, enc_keep))
            tok = logp.gather(-1, dec_out[..., None]).squeeze(-1)                   # (batch, t+1)
            return tok.masked_fill(dec_out == PAD, 0.0).sum(1)
        lengths = (tgt != PAD).sum(1)
        logp = self.scoring_log_probs(self.nar_states(lengths, enc, enc_keep,
                                                      max_tgt_len=tgt.size(1)))
        with full_precision(enc.device.type):
            len_logp = self.length_logits(enc.float()).float().log_softmax(-1)  # (batch, max_len+1)
        # >>> exercise 7: the E-step's selection
        # (batch, t)
        tok = logp.gather(-1, tgt[..., None]).squeeze(-1).masked_fill(tgt == PAD, 0.0)
        return len_logp.gather(1, lengths[:, None]).squeeze(1) + tok.sum(1)
        # <<< exercise 7


def keep_freed_memory_on_cpu():
    """CPU speed: glibc hands large freed blocks (the (tokens, vocab) logits are ~100 MB) back to
    the OS and page-faults them in again at the next step; raising its mmap and trim thresholds
    keeps them in the heap for reuse (+15% training throughput and -30% time for batched
    rescoring, measured on a 2-core CPU). No-op without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        # M_MMAP_THRESHOLD: serve large blocks from the heap
        libc.mallopt(-3, 1 << 30)
        # M_TRIM_THRESHOLD: keep freed heap memory
        libc.mallopt(-1, 1 << 31)
    except (OSError, AttributeError):
        pass


def synchronize(device):
    """Wait for queued GPU work (CUDA or MPS) to finish, so that a timer reads the real time."""
    device_type = torch.device(device).type
    if device_type == "cuda":
        torch.cuda.synchronize()
    elif device_type == "mps":
        torch.mps.synchronize()


def pick_device(name=None):
    """The given device, else the best available: CUDA > Apple MPS > CPU."""
    if name:
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


class LinesWhenRedirected:
    """A progress bar's output for a file or pipe: each redraw becomes one line, and the blank
    redraws (clearing the bar) none, so a log holds a line per interval instead of carriage-return
    frames."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def progress_bar(iterable=None, **options):
    """A tqdm bar that redraws a terminal at most 10 times a second; where standard error is not a
    terminal (a log on a server), one line every 60 seconds."""
    if sys.stderr.isatty():
        return tqdm(iterable, leave=False, dynamic_ncols=True, **options)
    return tqdm(iterable, leave=False, file=LinesWhenRedirected(sys.stderr), mininterval=60,
                maxinterval=120, ncols=100, **options)


# Attention kernels (F.scaled_dot_product_attention's backends). "auto" is PyTorch's choice per
# call; the GPU check (docs/reproducing.md) times each one on em-nat's shapes, so that a default is
# chosen by measurement. "flash" takes no mask: only the AR decoder's causal self-attention can use
# it.
ATTENTION_BACKENDS = ("auto", "math", "efficient", "cudnn", "flash")


def attention_backend(name):
    """A context in which attention runs on one backend of ATTENTION_BACKENDS."""
    if name == "auto":
        return nullcontext()
    if sdpa_kernel is None:
        raise ValueError(f"--attention {name} needs torch 2.3 or later (this is "
                         f"{torch.__version__})")
    backends = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}
    return sdpa_kernel(backends[name])


def check_device(name):
    """`name` (None: pick_device's choice) if this machine has that device; else a one-line
    ValueError that names --device and the devices there are (torch would fail later, in a
    traceback)."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = torch.backends.mps.is_available()
    available = ["cpu"] + (["cuda"] if gpus else []) + (["mps"] if mps else [])
    try:
        device = torch.device(name or "cpu")
    except RuntimeError:                                  # not a device name at all (e.g. "gpu")
        device = None
    # a GPU's index must be one of the machine's (cpu and mps have one device)
    if device is not None and device.type in available and (device.index or 0) < max(gpus, 1):
        return name
    shown = [f"cuda ({gpus} GPU{'s' if gpus > 1 else ''})" if kind == "cuda" else kind
             for kind in available]
    raise ValueError(f"--device {name}: not on this machine; available: {', '.join(shown)}")


PRECISIONS = ("auto", "bf16", "fp32")


def resolve_precision(precision, device):
    """The precision a run computes in: "auto" is bf16 autocast on a CUDA GPU that has native bf16
    (compute capability 8.0 and up: A100, H100, RTX 30xx and later), else fp32. Older GPUs (V100,
    T4) would emulate bf16 slowly or refuse it; CPU bf16 is slow; MPS support varies by version."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    device = torch.device(device)
    if precision == "auto":
        native = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
        return "bf16" if native else "fp32"
    if precision == "bf16" and device.type != "cuda":
        raise ValueError(f"--precision bf16 needs a CUDA device (this run is on {device.type}); "
                         f"use fp32")
    return precision


def precision_context(device, precision):
    """bf16 autocast where the run computes in bf16; no autocast object at all otherwise (some torch
    versions refuse an autocast for a device they do not know, even a disabled one)."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def full_precision(device_type):
    """Switch bf16 autocast off inside a region (scores in float32). Only CUDA and CPU autocast
    exist in every torch version em-nat supports; elsewhere (MPS) em-nat never autocasts: nothing to
    switch off."""
    if device_type in ("cuda", "cpu"):
        return torch.autocast(device_type=device_type, enabled=False)
    return nullcontext()


def build_model(cfg: ModelConfig, device="cpu"):
    return Transformer(cfg).to(device)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ----- counting what sets the speed on a GPU: kernel launches and host syncs ---------------------
# On a GPU em-nat is rarely limited by arithmetic: every PyTorch operation that computes something
# is one kernel launch (tens of microseconds of host time), and every host sync (the host waits for
# the device to hand a value back: .item(), int(t), bool(t), .tolist(), .cpu(), nonzero) drains the
# device's queue. Both can be counted on any device, the CPU included, with a TorchDispatchMode,
# which sees every ATen operation a piece of code runs:
#
#     with Counts() as counts:
#         ar_greedy(model, src)
#     counts.launches, counts.syncs, counts.by_name
#
# Views (reshape without a copy, slicing, transpose, expand) launch nothing and are not counted; a
# CUDA graph replay (decode.Graphed) counts as one launch, whatever it holds. The counts are exact
# and repeatable: tests/test_gpu_path.py holds them to budgets, decode.py --benchmark prints them.

# Operations that make the host wait for the device: a scalar read back (item, int, float, bool of a
# tensor), and operations whose output size depends on the data.
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2"}
# Tensor methods that copy to the host without an ATen operation the dispatcher sees.
HOST_COPIES = ("tolist", "numpy")
# Metadata-only operations: no kernel.
NO_KERNEL = {"detach", "alias", "lift_fresh", "_to_copy_noop", "empty", "empty_strided",
             "empty_like", "new_empty", "new_empty_strided", "set_", "resize_", "_reshape_alias",
             "sym_size", "sym_stride", "sym_numel", "is_same_size",
             "_has_compatible_shallow_copy_type"}


class Counts(TorchDispatchMode):
    """Counts the kernel launches and host syncs of the code run inside `with Counts() as c:`."""

    def __init__(self):
        super().__init__()
        self.by_name = Counter()
        self.syncs = 0
        self.saved = {}
        self.paused = False              # True: operations run without being counted

    @property
    def launches(self):
        return sum(self.by_name.values())

    def graph_replay(self):
        """A CUDA graph replay: one launch (decode.Graphed tells the active counters)."""
        self.by_name["cuda graph replay"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.paused:
            return func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in SYNC_OPS:
            self.syncs += 1
        if not (func.is_view or name in NO_KERNEL):
            self.by_name[name] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        for method in HOST_COPIES:
            original = getattr(torch.Tensor, method)
            self.saved[method] = original

            def counted(tensor, *args, _original=original, **kwargs):
                self.syncs += 1
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, method, counted)
        ACTIVE_COUNTERS.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        for method, original in self.saved.items():
            setattr(torch.Tensor, method, original)
        ACTIVE_COUNTERS.remove(self)
        return super().__exit__(*exc)


ACTIVE_COUNTERS = []                     # the Counts now counting (decode.Graphed reports to them)


# ----- checkpoints: a plain state dict plus config JSON, each written atomically -----------------
class CheckpointError(ValueError):
    """A checkpoint that cannot be used, worded as one line saying which file and why."""


def write_atomic(path, content):
    """Write a file so that a kill or a crash leaves the previous file (or none), never a
    truncated one: `content` (text, written in UTF-8, or any object for torch.save) goes to a
    temporary file in the same directory, which then takes the file's name."""
    text = isinstance(content, str)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w" if text else "wb", encoding="utf-8" if text else None) as f:
        if text:
            f.write(content)
        else:
            torch.save(content, f)
        f.flush()
        os.fsync(f.fileno())                          # on the disk before it takes the name
    os.replace(tmp, path)


def save_checkpoint(model, directory, **meta):
    """directory/config.json (model config + `meta`) and directory/model.pt (state dict)."""
    os.makedirs(directory, exist_ok=True)
    write_atomic(os.path.join(directory, "config.json"),
                 json.dumps({"model": model.cfg.to_dict(), **meta}, indent=2))
    write_atomic(os.path.join(directory, "model.pt"),
                 {k: v.detach().cpu() for k, v in model.state_dict().items()})


def read_config(directory):
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
        known = {f.name for f in fields(ModelConfig)}
        return ModelConfig(**{k: v for k, v in config["model"].items() if k in known}), config
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a checkpoint directory holds config.json and "
                              f"model.pt") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: not an em-nat checkpoint config ({err})") from None


def load_checkpoint(directory, device="cpu"):
    """The model saved in `directory` (eval mode) and its config dict."""
    cfg, config = read_config(directory)
    path = os.path.join(directory, "model.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; was the run interrupted before this stage "
                              f"finished?") from None
    except Exception as err:
        # torch reports truncation and foreign formats with many exception types
        raise CheckpointError(f"{path}: unreadable, truncated or not a PyTorch state dict "
                              f"({type(err).__name__}); "
                              f"delete the directory to retrain this stage") from None
    model = Transformer(cfg)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: weights do not fit the config in config.json "
                              f"({first})") from None
    return model.to(device).eval(), config
