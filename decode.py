"""decode.py: everything that turns a trained model into text (PAPER.md Sec. 5).

- AR: greedy and beam search over a whole batch at once with the key/value cache, the GNMT length
  penalty ((5 + |y|) / 6)^alpha, early stop once every beam has ended, and N-best lists (the EM loop
  asks for N = 20 candidates per training source).
- NAR: the predicted length, or a beam of lengths around it, all decoded in one batched pass; argmax or
  ODD (optimal de-duplicated) decoding: the best sequence of the predicted length with no two equal
  neighbours, by Viterbi over the top-3 tokens of each position, batched on the model's device.
- NPD rescoring: the AR model scores every length candidate in one teacher-forced pass.
- BLEU with sacreBLEU, and a command-line translator and latency benchmark:

    python decode.py --checkpoint runs/toy/em2-nar --input valid.txt
    python decode.py --checkpoint runs/toy/em2-nar --rescore-with runs/toy/em2-ar --length-beam 5
    python decode.py --benchmark --preset iwslt

Hot loops (beam steps, Viterbi steps) are tensor work with no host synchronisation, except the beam
search's "all finished?" test, which runs every EARLY_STOP_EVERY steps.
"""
import argparse
import os
import sys
import time

import sacrebleu
import torch
from tqdm import tqdm

from data import BPE, DataError, Vocab, make_batches, pad_batch, read_lines, remove_bpe
from model import (EOS, PAD, BOS, CheckpointError, Transformer, ar_log_probs, autocast_for,
                   keep_freed_memory_on_cpu, load_checkpoint, model_config, nar_log_probs, pick_device)

EARLY_STOP_EVERY = 4          # beam steps between "are all beams finished?" host checks
NEG_INF = float("-inf")


# ------------------------------------------------------------------------------------------------
# AR decoding
# ------------------------------------------------------------------------------------------------
def length_penalty(lengths, alpha):
    """GNMT length penalty ((5 + len) / 6)^alpha; scores are divided by it (PAPER.md Sec. 5)."""
    return ((5.0 + lengths.float()) / 6.0) ** alpha


def max_output_len(src, model, a=1.2, b=10):
    """Longest AR output allowed per sentence, a * |x| + b capped by the model: (batch,)."""
    src_len = (src != PAD).sum(1)
    return (a * src_len + b).long().clamp(max=model.cfg.max_len)


@torch.no_grad()
def ar_greedy(model, src, max_len=None):
    """Greedy AR decoding. src: (batch, src_len) -> tokens (batch, out_len), PAD after the end."""
    max_len = max_output_len(src, model) if max_len is None else max_len
    enc, keep = model.encode(src)
    cache, steps = model.new_cache(), int(max_len.max())
    token = src.new_full((src.size(0),), BOS)
    finished = torch.zeros_like(token, dtype=torch.bool)
    out = []
    for step in range(steps):
        token = ar_log_probs(model.ar_step(token, step, enc, keep, cache)).argmax(-1)
        token = torch.where(step + 1 >= max_len, torch.full_like(token, EOS), token)  # forced end
        token = token.masked_fill(finished, PAD)
        out.append(token)
        finished |= token == EOS
        if (step + 1) % EARLY_STOP_EVERY == 0 and bool(finished.all()):
            break
    tokens = torch.stack(out, 1)                                          # (batch, steps)
    return tokens.masked_fill(tokens == EOS, PAD)


@torch.no_grad()
def ar_beam_search(model, src, beam=5, alpha=1.0, nbest=1, max_len=None):
    """Batched beam search. src: (batch, src_len).
    Returns tokens (batch, nbest, out_len) PAD-padded without <eos>, and their length-normalised
    scores (batch, nbest), best first. A finished hypothesis stays in its beam and is extended by PAD
    at no cost, so it keeps competing on its raw log-probability; the final ranking divides by the
    length penalty of its length including <eos>."""
    b, k = src.size(0), beam
    max_len = max_output_len(src, model) if max_len is None else max_len
    enc, keep = model.encode(src)
    enc, keep = enc.repeat_interleave(k, 0), keep.repeat_interleave(k, 0)  # (batch*beam, src_len+1, d)
    row_max_len = max_len.repeat_interleave(k)                             # (batch*beam,)
    cache, steps = model.new_cache(), int(max_len.max())                   # one sync, before the loop
    tokens = src.new_full((b * k, 1), BOS)                                 # (batch*beam, 1 + steps)
    scores = torch.full((b, k), NEG_INF, device=src.device)
    scores[:, 0] = 0.0                                                     # one live beam at first
    finished = torch.zeros(b * k, dtype=torch.bool, device=src.device)
    out_len = torch.zeros(b * k, dtype=torch.long, device=src.device)      # length incl. <eos>
    sentence_base = (torch.arange(b, device=src.device) * k)[:, None]      # (batch, 1)
    for step in range(steps):
        logp = ar_log_probs(model.ar_step(tokens[:, -1], step, enc, keep, cache))  # (batch*beam, vocab)
        ending = (step + 1 >= row_max_len)[:, None]
        logp = torch.where(ending & (torch.arange(logp.size(1), device=src.device) != EOS), NEG_INF, logp)
        # A finished beam may only continue with PAD, at no cost.
        pad_only = torch.full_like(logp[0], NEG_INF)
        pad_only[PAD] = 0.0
        logp = torch.where(finished[:, None], pad_only, logp)
        vocab = logp.size(1)
        candidates = (scores.view(-1, 1) + logp).view(b, k * vocab)        # (batch, beam*vocab)
        scores, flat = candidates.topk(k, dim=1)                           # (batch, beam)
        origin = (flat // vocab + sentence_base).view(-1)                  # rows the beams came from
        new_token = (flat % vocab).view(-1)
        was_finished = finished.index_select(0, origin)
        out_len = torch.where(was_finished, out_len.index_select(0, origin), torch.full_like(out_len, step + 1))
        finished = was_finished | (new_token == EOS)
        tokens = torch.cat([tokens.index_select(0, origin), new_token[:, None]], dim=1)
        model.reorder_cache(cache, origin)
        if (step + 1) % EARLY_STOP_EVERY == 0 and bool(finished.all()):
            break
    normalised = scores / length_penalty(out_len.view(b, k), alpha)
    normalised = normalised.masked_fill(~finished.view(b, k), NEG_INF)    # never return a cut-off beam
    best_scores, order = normalised.topk(nbest, dim=1)                     # (batch, nbest)
    rows = (order + sentence_base).view(-1)
    out = tokens.index_select(0, rows)[:, 1:]                              # drop <bos>
    out = out.masked_fill(out == EOS, PAD)
    return out.view(b, nbest, -1), best_scores


# ------------------------------------------------------------------------------------------------
# NAR decoding
# ------------------------------------------------------------------------------------------------
def odd_viterbi(logp, lengths, k=3):
    """ODD decoding (PAPER.md Sec. 5): argmax over y of sum_t logp[t, y_t] subject to y_t != y_{t-1},
    for each row of a batch, by Viterbi over the top-k tokens of every position.
    k = 3 is exact, not an approximation: a position has two neighbours, which forbid at most two
    tokens, so one of its top three is always allowed and at least as good as any token outside them.
    logp: (batch, t, vocab); lengths: (batch,). Returns tokens (batch, t) PAD after the length, and
    scores (batch,)."""
    n, t, _ = logp.shape
    top_val, top_tok = logp.topk(min(k, logp.size(-1)), dim=-1)           # (batch, t, k)
    real = torch.arange(t, device=logp.device)[None, :] < lengths[:, None]  # (batch, t)
    top_val = top_val.masked_fill(~real[..., None], 0.0)                   # past the end: free
    # transition[b, s, i, j]: moving from candidate i at position s to candidate j at s + 1.
    same = top_tok[:, :-1, :, None] == top_tok[:, 1:, None, :]             # (batch, t-1, k, k)
    transition = (same & real[:, 1:, None, None]).float() * -1e9
    delta, backpointers = top_val[:, 0], []                                # (batch, k)
    for s in range(1, t):
        best_prev, arg_prev = (delta[:, :, None] + transition[:, s - 1]).max(dim=1)   # (batch, k)
        delta = best_prev + top_val[:, s]
        backpointers.append(arg_prev)
    score, choice = delta.max(dim=1)                                       # (batch,)
    path = [choice]
    for arg_prev in reversed(backpointers):
        choice = arg_prev.gather(1, choice[:, None]).squeeze(1)
        path.append(choice)
    path = torch.stack(path[::-1], dim=1)                                  # (batch, t)
    tokens = top_tok.gather(2, path[..., None]).squeeze(-1)
    return tokens.masked_fill(~real, PAD), score


def argmax_decode(logp, lengths):
    """Plain NAR decoding: the most likely token at every position. Same shapes as odd_viterbi."""
    score, tokens = logp.max(dim=-1)                                       # (batch, t)
    real = torch.arange(logp.size(1), device=logp.device)[None, :] < lengths[:, None]
    return tokens.masked_fill(~real, PAD), score.masked_fill(~real, 0.0).sum(1)


@torch.no_grad()
def nar_decode(model, src, length_beam=1, odd=True, rescorer=None, alpha=1.0, lengths=None):
    """NAR decoding of a batch (PAPER.md Sec. 5).
    Length candidates: the predicted length L (or the given `lengths`, for oracle-length analysis)
    and its neighbours L - floor(B/2) .. L + floor(B/2) for a length beam B, all decoded in one pass.
    Each candidate is scored by the NAR model (log p(T|x) + its tokens' log-probs) or, with an AR
    `rescorer`, by the AR log-likelihood over the length penalty (NPD); the best is kept.
    src: (batch, src_len) -> tokens (batch, out_len), PAD-padded."""
    b, beam = src.size(0), length_beam
    enc, keep = model.encode(src)
    len_logp = model.length_logits(enc).float().log_softmax(-1)           # (batch, max_len+1)
    len_logp[:, 0] = NEG_INF                                               # no empty outputs
    center = len_logp.argmax(-1) if lengths is None else lengths
    offsets = torch.arange(beam, device=src.device) - beam // 2
    cand_len = (center[:, None] + offsets).clamp(1, model.cfg.max_len)    # (batch, beam)
    flat_len = cand_len.view(-1)
    enc, keep = enc.repeat_interleave(beam, 0), keep.repeat_interleave(beam, 0)
    logp = nar_log_probs(model.nar_logits(flat_len, enc, keep))           # (batch*beam, t, vocab)
    tokens, token_score = (odd_viterbi if odd else argmax_decode)(logp, flat_len)
    if rescorer is not None and beam > 1:
        src_rows = src.repeat_interleave(beam, 0)
        score = rescorer.score(src_rows, tokens) / length_penalty(flat_len + 1, alpha)
    else:
        score = len_logp.gather(1, cand_len).view(-1) + token_score
    best = score.view(b, beam).argmax(1)                                   # (batch,)
    return tokens.view(b, beam, -1)[torch.arange(b, device=src.device), best]


# ------------------------------------------------------------------------------------------------
# Whole corpora
# ------------------------------------------------------------------------------------------------
def tokens_to_lists(tokens):
    """(batch, len) PAD-padded ids -> list of id lists, one host transfer for the whole batch."""
    return [[i for i in row if i != PAD] for row in tokens.tolist()]


@torch.no_grad()
def translate_ids(model, sources, method="beam", beam=5, alpha=1.0, nbest=1, length_beam=1, odd=True,
                  rescorer=None, max_tokens=4096, device="cpu", progress=False):
    """Translate a list of source id lists, batching by a token budget and restoring the order.
    method: "greedy" | "beam" (AR) | "nar". Returns a list of id lists, or with nbest > 1 a list of
    nbest-lists. On CUDA the models run under bf16 autocast."""
    rows_per_source = beam if method == "beam" else (length_beam if method == "nar" else 1)
    batches = make_batches([len(s) for s in sources], max(max_tokens // rows_per_source, 1))
    results = [None] * len(sources)
    model.eval()
    bar = tqdm(total=len(sources), desc=f"decode ({method})", disable=not progress, leave=False)
    with autocast_for(device):
        for batch in batches:
            src = pad_batch([sources[i] for i in batch], device)
            if method == "greedy":
                outs = tokens_to_lists(ar_greedy(model, src))
            elif method == "beam":
                tokens, _ = ar_beam_search(model, src, beam=beam, alpha=alpha, nbest=nbest)
                flat = tokens_to_lists(tokens.flatten(0, 1))
                outs = [flat[i * nbest:(i + 1) * nbest] for i in range(len(batch))] if nbest > 1 else flat
            else:
                outs = tokens_to_lists(nar_decode(model, src, length_beam=length_beam, odd=odd,
                                                  rescorer=rescorer, alpha=alpha))
            for i, out in zip(batch, outs):
                results[i] = out
            bar.update(len(batch))
    bar.close()
    return results


# ------------------------------------------------------------------------------------------------
# Text and BLEU
# ------------------------------------------------------------------------------------------------
ESCAPES = {"&apos;": "'", "&quot;": '"', "&amp;": "&", "&lt;": "<", "&gt;": ">", "&#91;": "[", "&#93;": "]",
           "&#124;": "|"}


NO_SPACE_BEFORE = {".", ",", "!", "?", ";", ":", "%", ")", "]", "}", "n't", "'s", "'re", "'ve", "'ll", "'d", "'m", "'t"}
NO_SPACE_AFTER = {"(", "[", "{", "$"}


def detokenize(text):
    """Undo Moses-style English tokenisation well enough for sacreBLEU: unescape entities and glue
    punctuation, clitics and quotes back ("he said &quot; it &apos;s fine . &quot;" ->
    'he said "it's fine."')."""
    for escaped, char in ESCAPES.items():
        text = text.replace(escaped, char)
    words, glue_next, quote_open = [], False, False
    for tok in text.split():
        closing_quote = tok == '"' and quote_open
        glue = words and (glue_next or tok in NO_SPACE_BEFORE or closing_quote)
        glue_next = tok in NO_SPACE_AFTER or (tok == '"' and not quote_open)
        quote_open ^= tok == '"'
        if glue:
            words[-1] += tok
        else:
            words.append(tok)
    return " ".join(words)


def bleu(hypotheses, references, tokenized=True):
    """Corpus BLEU. references: list of reference lists (one list per reference set).
    tokenized=True: 'tokenised BLEU' on the text as it is (tokenize='none'), the figure NAT papers
    report; tokenized=False: sacreBLEU's standard 13a BLEU on detokenised text. Returns (score, signature)."""
    if tokenized:
        # force=True: the text is tokenised on purpose here, so sacreBLEU's "forgot to detokenize?"
        # warning does not apply.
        metric = sacrebleu.BLEU(tokenize="none", force=True)
        result = metric.corpus_score(hypotheses, references)
    else:
        metric = sacrebleu.BLEU()
        result = metric.corpus_score([detokenize(h) for h in hypotheses],
                                     [[detokenize(r) for r in refs] for refs in references])
    return result.score, str(metric.get_signature())


def ids_to_text(ids, vocab, is_bpe):
    text = " ".join(vocab.decode(ids))
    return remove_bpe(text) if is_bpe else text


# ------------------------------------------------------------------------------------------------
# Command line: translate, or benchmark latency
# ------------------------------------------------------------------------------------------------
def load_translator(directory, device):
    """A checkpoint directory -> (model, config dict, vocab, bpe or None)."""
    model, config = load_checkpoint(directory, device)
    vocab = Vocab.load(os.path.join(directory, "vocab.txt"))
    if len(vocab) != model.cfg.vocab_size:
        raise CheckpointError(f"{directory}/vocab.txt has {len(vocab)} entries but the model was built for "
                              f"{model.cfg.vocab_size}: the vocabulary does not belong to this checkpoint")
    bpe_path = os.path.join(directory, "bpe.codes")
    return model, config, vocab, BPE.load(bpe_path) if os.path.isfile(bpe_path) else None


def translate_lines(lines, model, vocab, bpe, is_bpe, args, rescorer, device):
    """One output line per input line; empty or over-long input lines are handled, never dropped."""
    limit = model.cfg.max_len
    sources = []
    for line in lines:
        words = line.split()
        pieces = bpe.encode(words) if bpe is not None else words
        sources.append(vocab.encode(pieces)[:limit])          # over-long input: cut to the model's limit
    nonempty = [i for i, s in enumerate(sources) if s]
    method = "nar" if model.cfg.kind == "nar" else ("greedy" if args.beam == 1 else "beam")
    outs = translate_ids(model, [sources[i] for i in nonempty], method=method, beam=args.beam, alpha=args.alpha,
                         length_beam=args.length_beam, odd=not args.no_odd, rescorer=rescorer,
                         device=device, progress=len(nonempty) > 50)
    text = [""] * len(lines)
    for i, out in zip(nonempty, outs):
        text[i] = ids_to_text(out, vocab, is_bpe)
    return text


def benchmark(args, device):
    """Latency of AR (greedy, beam) vs NAR (ODD with one length, length beam + AR rescoring) on the
    same sentences in one run. Random weights unless checkpoints are given: the AR model is then kept
    from ending early (its <eos> logit is masked) and the NAR model given the same output length, so
    both produce exactly --tgt-len tokens and the comparison is like for like."""
    torch.manual_seed(0)
    vocab_size = 10000
    ar = Transformer(model_config(args.preset, vocab_size, "ar", dropout=0.0)).to(device).eval()
    nar = Transformer(model_config(args.preset, vocab_size, "nar", dropout=0.0)).to(device).eval()
    with torch.no_grad():
        ar.out_bias[EOS] = NEG_INF
    n, src_len, tgt_len = args.sentences, args.src_len, args.tgt_len
    src = torch.randint(4, vocab_size, (n, src_len), device=device)
    fixed = torch.full((n,), tgt_len, device=device)
    out_len = fixed + 1                                   # AR: tgt_len tokens, then the forced <eos>

    def run(fn, batch_size):
        for i in range(0, min(batch_size * 2, n), batch_size):   # warm-up
            fn(src[i:i + batch_size], batch_size)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, n, batch_size):
            fn(src[i:i + batch_size], batch_size)
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000 / n    # ms per sentence

    systems = {
        "AR greedy": lambda s, bs: ar_greedy(ar, s, max_len=out_len[:len(s)]),
        f"AR beam {args.beam}": lambda s, bs: ar_beam_search(ar, s, beam=args.beam, alpha=args.alpha,
                                                             max_len=out_len[:len(s)]),
        "NAR ODD (1 length)": lambda s, bs: nar_decode(nar, s, lengths=fixed[:len(s)]),
        "NAR ODD + AR rescoring (9 lengths)": lambda s, bs: nar_decode(   # the paper's length beam B = 9
            nar, s, length_beam=9, rescorer=ar, alpha=args.alpha, lengths=fixed[:len(s)]),
    }
    print(f"benchmark: preset {args.preset}, random weights, device {device}, {n} sentences, "
          f"{src_len} source -> {tgt_len} target tokens, {torch.get_num_threads()} threads")
    table = []
    with autocast_for(device):
        for batch_size in (1, args.batch_size):
            times = {name: run(fn, batch_size) for name, fn in tqdm(systems.items(), desc=f"batch {batch_size}",
                                                                    leave=False)}
            beam_ms = times[f"AR beam {args.beam}"]
            for name, ms in times.items():
                table.append((batch_size, name, ms, 1000 / ms, beam_ms / ms, times["AR greedy"] / ms))
    print(f"\n{'batch':>5}  {'system':<40} {'ms/sent':>9} {'sent/s':>9} {'vs beam':>8} {'vs greedy':>9}")
    for batch_size, name, ms, per_s, vs_beam, vs_greedy in table:
        print(f"{batch_size:>5}  {name:<40} {ms:>9.2f} {per_s:>9.1f} {vs_beam:>7.1f}x {vs_greedy:>8.1f}x")
    return table


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default except the absent ones (None): those say in words where they come from."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    p = argparse.ArgumentParser(
        description="Translate with an em-nat checkpoint (AR or NAR), or benchmark decoding latency.",
        formatter_class=HelpFormatter)
    p.add_argument("--checkpoint", help="a stage directory of a run, e.g. runs/toy/em2-nar")
    p.add_argument("--input", help="text file, one sentence per line (default: standard input)")
    p.add_argument("--output", help="write translations here (default: standard output)")
    p.add_argument("--beam", type=int, default=5, help="AR beam size (1 = greedy)")
    p.add_argument("--alpha", type=float, default=1.0, help="length penalty exponent (paper: 1.4 on IWSLT14)")
    p.add_argument("--length-beam", type=int, default=1, help="NAR: number of length candidates (paper: 1 or 9)")
    p.add_argument("--no-odd", action="store_true", help="NAR: plain argmax instead of ODD decoding")
    p.add_argument("--rescore-with", help="NAR: AR checkpoint directory that rescores the length candidates (NPD)")
    p.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    b = p.add_argument_group("benchmark (random weights; no checkpoint needed)")
    b.add_argument("--benchmark", action="store_true", help="measure AR vs NAR latency and print a table")
    b.add_argument("--preset", default="iwslt", help="model size to time")
    b.add_argument("--sentences", type=int, default=64, help="sentences timed per system and batch size")
    b.add_argument("--src-len", type=int, default=25, help="source length in tokens")
    b.add_argument("--tgt-len", type=int, default=25, help="output length in tokens")
    b.add_argument("--batch-size", type=int, default=64, help="the large batch size timed besides 1")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    keep_freed_memory_on_cpu()
    if args.benchmark:
        benchmark(args, device)
        return
    if not args.checkpoint:
        sys.exit("decode.py: give --checkpoint DIR (a stage directory of a run), or --benchmark")
    try:
        model, config, vocab, bpe = load_translator(args.checkpoint, device)
        rescorer = load_translator(args.rescore_with, device)[0] if args.rescore_with else None
        lines = read_lines(args.input) if args.input else sys.stdin.read().splitlines()
    except (CheckpointError, DataError) as err:
        sys.exit(f"decode.py: {err}")
    text = translate_lines(lines, model, vocab, bpe, config.get("is_bpe", False), args, rescorer, device)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    out.write("".join(line + "\n" for line in text))
    if args.output:
        out.close()


if __name__ == "__main__":
    main()
