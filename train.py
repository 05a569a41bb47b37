"""train.py: the training loop that both models of the EM loop learn with. It knows nothing of EM:
give it a model, (source, target) id pairs and a TrainConfig, and it trains, checkpoints and
resumes.

- AdamW (no weight decay on layer norms and biases), the inverse-square-root warm-up schedule,
  gradient clipping, token-budget batches (data.make_batches), periodic validation loss.
- The stage's model is the last step's weights (as the paper's official scripts keep), optionally
  the mean of the last K checkpoints, or the checkpoint of lowest validation loss (final_model).
- Ctrl-C stops after the current step and saves the loop's state; calling train_model again with the
  same directory continues from it and reaches the same weights as an uninterrupted run.
- Several processes (torchrun): PyTorch's DistributedDataParallel, and the few helpers the EM loop
  needs to split decoding work between processes (shard, gather).

`python train.py` runs the whole EM pipeline: the command line lives in em_nat.py, which uses
this file.
"""
import datetime
import math
import os
import random
import runpy
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass

import torch

from data import collate, make_batches
from model import (PRECISIONS, count_parameters, pick_device, precision_context, progress_bar,
                   save_checkpoint, write_atomic)
from options import option

# torch.OutOfMemoryError is new in torch 2.5; older versions raise torch.cuda.OutOfMemoryError.
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError


@dataclass
class TrainConfig:
    """How a model is trained. The fields declared with `option` are also options of `python
    train.py`; where their command-line default is None, em_nat.py takes the preset's value."""
    lr: float = option(1e-3, "peak learning rate, reached after --warmup steps (default: the "
                             "preset's)", cli_default=None)
    warmup: int = option(4000, "warm-up steps (default: the preset's)", cli_default=None)
    max_tokens: int = option(4096, "token budget of a batch (padded source or target tokens; "
                                   "default: the preset's)", cli_default=None)
    ar_steps: int = option(60000, "optimizer steps per AR model (default: the preset's)",
                           cli_default=None)
    # the paper trains NAR ~3x longer
    nar_steps: int = option(200000, "optimizer steps per NAR model (default: the preset's)",
                            cli_default=None)
    clip: float = 1.0
    weight_decay: float = 1e-4
    valid_every: int = option(1000, "steps between validations (default: the preset's)",
                              cli_default=None)
    update_freq: int = option(1, "batches whose gradients make one update (per process; under "
                                 "torchrun each of the N processes takes K batches: an update of N "
                                 "x K batches)")
    final_model: str = option("last", "each stage's model: the last step's (as the paper's "
                                      "scripts), or the checkpoint of lowest validation loss "
                                      "(misleading for NAR models trained on distilled targets)",
                              choices=["last", "best"])
    average_last: int = option(1, "with --final-model last: the mean of the last K checkpoints, "
                                  "taken every --valid-every steps (as fairseq's "
                                  "average_checkpoints.py)", metavar="K")
    dropout: float = option(None, "dropout of every model (default: the preset's)")
    seed: int = 1
    device: str = option("cpu", "cpu, cuda or mps (default: the best available; under torchrun "
                                "each process takes the GPU of its local rank)", cli_default=None)
    decode_tokens: int = option(None, "token budget of a decoding batch, hypothesis rows x source "
                                      "tokens (the E-step's N-best, distillation, evaluation; "
                                      "default: 4x --max-tokens on the CPU and MPS, 32x on CUDA)",
                                minimum=1)
    compile: bool = option(False, "train through torch.compile (fewer, fused kernels; minutes of "
                                  "compilation first; on a 2-core CPU no faster for the toy "
                                  "preset; on a GPU the GPU check times it: docs/reproducing.md)")
    # "bf16": autocast (model.resolve_precision picks it where the GPU has it)
    precision: str = option("fp32", "auto: bf16 autocast on a GPU with native bf16 (compute "
                                    "capability 8.0+), else fp32", cli_default="auto",
                            choices=PRECISIONS)

    def __post_init__(self):
        if self.final_model not in ("best", "last"):
            raise ValueError(f"final_model must be 'best' or 'last', not {self.final_model!r}")
        if self.update_freq < 1 or self.average_last < 1:
            raise ValueError("update_freq and average_last count batches and checkpoints: "
                             "at least 1")
        if self.average_last > 1 and self.final_model != "last":
            raise ValueError("averaging the last checkpoints (average_last > 1) needs "
                             "final_model 'last'")
        for name in ("lr", "warmup", "max_tokens", "ar_steps", "nar_steps", "valid_every"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")

    def steps_for(self, kind):
        return self.ar_steps if kind == "ar" else self.nar_steps


# Training defaults per model preset. "toy" finishes the whole EM pipeline in minutes on a laptop
# CPU; "iwslt" is the paper's IWSLT14 schedule in steps. Its update is smaller than its 8192-token
# batch: the official batch size 35000 counts padded positions at the maximum length 175, i.e. 200
# sentence pairs (about 5k target tokens); --max-tokens 5000 holds ~200 pairs of IWSLT14-like
# lengths (docs/reproducing.md, "Batch arithmetic"). WMT14 (base): 160 pairs x update_freq 8. The
# defaults stay, so that runs resume as they began.
TRAIN_PRESETS = {
    "toy": dict(lr=3e-3, warmup=200, max_tokens=2048, ar_steps=1200, nar_steps=1500,
                valid_every=300),
    "small": dict(lr=1e-3, warmup=1000, max_tokens=4096, ar_steps=6000, nar_steps=8000,
                  valid_every=500),
    "iwslt": dict(lr=1e-3, warmup=4000, max_tokens=8192, ar_steps=60000, nar_steps=200000,
                  valid_every=2000),
    "base": dict(lr=7e-4, warmup=4000, max_tokens=8192, ar_steps=100000, nar_steps=300000,
                 valid_every=2000),
}


# ----- several processes (torchrun): PyTorch's DistributedDataParallel, and a few helpers --------
# Without torchrun (one process) every helper is the identity or does nothing. Under torchrun every
# process runs the same program on its own device: each trains on its share of every update's
# batches (update_batches) and DDP averages the gradients; each decodes a share of the sources
# (shard) and all get the whole result back in order (gather); rank 0 alone writes files, and
# prints.
def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size():
    return torch.distributed.get_world_size() if distributed() else 1


def rank():
    return torch.distributed.get_rank() if distributed() else 0


def is_main():
    """The process that writes checkpoints, targets, results and logs."""
    return rank() == 0


def barrier():
    """Wait until every process gets here (e.g. before reading a file rank 0 wrote)."""
    if distributed():
        torch.distributed.barrier()


def sum_over_ranks(tensor):
    """The element-wise sum of a CPU tensor over the processes."""
    if distributed():
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        summed = tensor.to(device)
        torch.distributed.all_reduce(summed)
        return summed.cpu()
    return tensor


def any_rank(flag):
    """True on every process when it is true on one (a Ctrl-C seen by one process stops all)."""
    return bool(sum_over_ranks(torch.tensor([float(flag)]))) if distributed() else flag


def shard(items):
    """This process's share of a list: every world_size-th item from its rank (the shares are
    balanced in length when the list is sorted or random)."""
    return items[rank()::world_size()]


def gather(part):
    """The whole list back, in the original order, from every process's shard(...) results."""
    if not distributed():
        return part
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, part)
    return [parts[i % len(parts)][i // len(parts)] for i in range(sum(map(len, parts)))]


def all_parts(part):
    """Every process's `part` (any picklable object: e.g. a shard's N-best arrays), in rank
    order."""
    if not distributed():
        return [part]
    parts = [None] * world_size()
    torch.distributed.all_gather_object(parts, part)
    return parts


def from_main(obj):
    """Rank 0's `obj` on every process (what rank 0 alone computed: an evaluation)."""
    if not distributed():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def data_parallel(model):
    """The model wrapped in DistributedDataParallel under torchrun (its weights broadcast from rank
    0, its gradients averaged over the processes at each backward pass); else the model itself."""
    if not distributed():
        return model
    device = next(model.parameters()).device
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def compiled(net, cfg):
    """The network the loop trains through: `net` itself, or with cfg.compile its torch.compile'd
    version (the same parameters). dynamic=True: token-budget batches change shape at every step,
    and one compiled graph with symbolic sizes serves them all instead of a compile per shape."""
    return torch.compile(net, dynamic=True) if cfg.compile else net


def gradients_kept_local(net, last):
    """Within an update, DDP should average the gradients once, at the last batch's backward pass:
    no_sync() before it. Nothing to do for a plain model."""
    return net.no_sync() if hasattr(net, "no_sync") and not last else nullcontext()


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to change."""


class Stopped(Exception):
    """The user stopped training (Ctrl-C); its state is saved and the same command resumes it."""


def make_optimizer(model, cfg):
    """AdamW; no weight decay on biases and layer-norm weights (the official optimization.py also
    spares them; it decays the embeddings too, as here)."""
    # Matrices (weights, embeddings) decay; vectors (biases, layer-norm gains) do not: decaying a
    # gain towards 0 would fight the normalisation it exists to scale.
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused AdamW updates every parameter in one kernel or a few, where the plain one runs
    # about ten operations per parameter tensor (~700 launches per step on the iwslt preset) and
    # reads its step counters on the host. Same update, up to float rounding; torch has it for
    # CUDA and, since 2.4, the CPU (4 ms -> 0.7 ms per step on the toy preset, 2 CPU cores).
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9, fused=True)
    except (RuntimeError, TypeError, ValueError):        # a device or torch without it
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)


def inverse_sqrt(warmup):
    """lr multiplier: linear warm-up to 1 at `warmup` steps, then (warmup / step)^0.5."""
    return lambda step: min((step + 1) / warmup, math.sqrt(warmup / (step + 1)))


@contextmanager
def graceful_interrupt():
    """The first Ctrl-C only raises a flag that the loop checks between steps (so it can save and
    leave cleanly); a second Ctrl-C stops at once."""
    flag = {"stop": False}

    def handler(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        print("\nstopping after this step (Ctrl-C again to stop at once) ...", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


@torch.no_grad()
def validation_loss(model, pairs, cfg):
    """Mean label-smoothed loss per target token over `pairs` (ids), with dropout off. The model
    comes back in the mode it came in: in the loop it goes on training; a finished model stays in
    eval mode (a model left in train mode would score the E-step's candidates with dropout on)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with precision_context(cfg.device, cfg.precision):
        for batch in make_batches([max(len(s), len(t)) + 1 for s, t in pairs], cfg.max_tokens):
            src, tgt = collate([pairs[i] for i in batch], cfg.device)
            loss, n = model(src, tgt)
            total += float(loss) * int(n)
            tokens += int(n)
    model.train(was_training)
    return total / max(tokens, 1)


def save_resume_state(path, model, optimizer, scheduler, position):
    """Everything needed to continue a stage's loop exactly where it stopped."""
    write_atomic(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "position": position,
                        "rng": torch.get_rng_state(),
                        "cuda_rng": (torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                                     else None)})


def forward_backward(model, src, tgt, cfg, desc, normalizers=None):
    """Loss and gradients of one batch (under bf16 autocast where cfg.precision says so). Returns
    (loss, target tokens).
    normalizers: see Transformer.forward. Out of memory becomes a TrainingError that says which
    budget to lower."""
    try:
        with precision_context(cfg.device, cfg.precision):
            loss, n_tokens = model(src, tgt, normalizers)
        loss.backward()
    except OUT_OF_MEMORY:
        raise TrainingError(f"{desc}: out of memory on a batch of {tgt.numel()} target tokens; "
                            f"lower --max-tokens (now {cfg.max_tokens})") from None
    return loss, n_tokens


def optimizer_step(model, optimizer, cfg):
    """Clip the gradient norm, take one AdamW step, clear the gradients."""
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def check_pairs(train_pairs, valid_pairs, desc):
    """Refuse to start a loop that could not train, or could never choose a checkpoint."""
    if not train_pairs:
        raise TrainingError(f"{desc}: no training pairs left (every target empty or over the "
                            f"length limit); "
                            f"if they come from an AR model, train that model longer (--ar-steps)")
    if not valid_pairs:
        raise TrainingError(f"{desc}: no validation pairs to choose the checkpoint with (every "
                            f"validation pair is empty or longer than the length limit?); the "
                            f"saved model would never change")


def restore_resume_state(path, model, optimizer, scheduler):
    """The loop's position saved by save_resume_state, with the weights, optimizer, schedule and RNG
    put back; or a fresh position when there is no resume file."""
    if not os.path.isfile(path):
        return {"step": 0, "epoch": 0, "batch": 0, "best": float("inf"), "tokens": 0,
                "seconds": 0.0}
    # weights_only=False: the file holds the position dict and RNG states, not only tensors; it is
    # one this loop wrote itself.
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])                 # the same dropout masks as an unbroken run
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["position"]


def update_batches(batches, cfg):
    """This process's token-budget batches for one update. An update is update_freq x world_size
    consecutive batches of the stream; rank r trains on the r-th run of update_freq of them, so N
    processes with update_freq K train on exactly the batches of one process with
    update_freq N x K."""
    # Every process draws the whole update from the same stream (same seed), then keeps its share:
    # no process needs to know what the others train on.
    update = [next(batches) for _ in range(cfg.update_freq * world_size())]
    return update[rank() * cfg.update_freq:(rank() + 1) * cfg.update_freq]


def update_normalizers(model, micro_batches):
    """The denominators of the loss of an update that spans several batches: its target tokens and
    sentences over all of them, on every process, divided by the number of processes (DDP averages
    the processes' gradients, so each contributes its sum over the whole update's count / N). None
    for one batch on one process: the model then divides by the batch's own counts, as it always
    has."""
    if len(micro_batches) == 1 and world_size() == 1:
        return None
    # Counted on the device and left there: reading them back would be a host sync per update.
    counts = torch.stack([model.target_counts(tgt) for _, tgt in micro_batches]).sum(0)
    return sum_over_ranks(counts) / world_size()                      # (tokens, sentences)


def remaining_batches(lengths, cfg, position):
    """Token-budget batches from the loop's position on, epoch after epoch (each epoch its own
    shuffle, so a resumed loop sees the same batches as an uninterrupted one). Updates position's
    epoch/batch."""
    while True:
        # The epoch's shuffle depends only on (seed, epoch): a resumed loop rebuilds the same list
        # and skips the batches it already trained on.
        batches = make_batches(lengths, cfg.max_tokens,
                               random.Random(cfg.seed * 100003 + position["epoch"]))
        for batch in batches[position["batch"]:]:
            position["batch"] += 1
            yield batch
        position["epoch"] += 1
        position["batch"] = 0


def train_step(net, optimizer, scheduler, micro_batches, cfg, desc, out_dir, step):
    """One update: the gradients of this process's batches (src, tgt) summed, each batch's loss
    its share of the whole update's per-token average; then one clipped AdamW step and one
    schedule step.
    net: the model, or its DistributedDataParallel wrapper (which averages the gradients over the
    processes at the update's last backward pass). Returns (the update's loss, this process's target
    tokens). A non-finite loss stops the loop."""
    model = getattr(net, "module", net)
    # Each batch's loss is divided by the token count of the whole update, not its own, so that the
    # summed gradients are those of one big batch, however the update is split.
    normalizers = update_normalizers(model, micro_batches)
    loss_sum, n_tokens = 0.0, 0
    for i, (src, tgt) in enumerate(micro_batches):
        with gradients_kept_local(net, last=i == len(micro_batches) - 1):
            loss, n = forward_backward(net, src, tgt, cfg, desc, normalizers)
        loss_sum, n_tokens = loss_sum + loss.detach(), n_tokens + n   # detach: no graph kept alive
    # The update's one host sync: the loss (for the check below and the progress bar) and the
    # token count, read back together.
    loss_value, n_tokens = torch.stack([sum_over_ranks(loss_sum) / world_size(),
                                        n_tokens.to(loss_sum.dtype)]).tolist()
    if not math.isfinite(loss_value):
        # Stop before the step: the weights saved at the last validation are still good.
        raise TrainingError(f"{desc}: the loss became {loss_value} at step {step}; the last good "
                            f"weights are in "
                            f"{out_dir}; lower --lr (now {cfg.lr}) and run again")
    optimizer_step(model, optimizer, cfg)
    scheduler.step()                                  # the learning rate of the next step
    return loss_value, round(n_tokens)


# ----- the stage's model: the best, the last, or the mean of the last checkpoints -----------------
def step_checkpoint_paths(out_dir):
    """The periodic checkpoints step<N>.pt of a loop that averages its last ones, oldest first."""
    names = [n for n in os.listdir(out_dir) if n.startswith("step") and n.endswith(".pt")]
    return [os.path.join(out_dir, n) for n in sorted(names, key=lambda n: int(n[4:-3]))]


def keep_checkpoint(model, out_dir, cfg, step, is_best, meta):
    """At a validation: the best model so far becomes model.pt (final_model "best"); or (final_model
    "last") this step's weights become step<N>.pt, keeping only the last average_last of them."""
    if not is_main():
        return
    if cfg.final_model == "best":
        if is_best:
            save_checkpoint(model, out_dir, **meta)
        return
    write_atomic(os.path.join(out_dir, f"step{step}.pt"),
                 {k: v.detach().cpu() for k, v in model.state_dict().items()})
    for old in step_checkpoint_paths(out_dir)[:-cfg.average_last]:
        os.remove(old)


def average_state_dicts(paths):
    """The element-wise mean of saved state dicts (as fairseq's average_checkpoints.py), summed in
    float64 and cast back to each tensor's dtype."""
    states = [torch.load(p, map_location="cpu", weights_only=True) for p in paths]
    return {k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype)
            for k, v in states[0].items()}


def finish_model(model, out_dir, cfg, meta):
    """Put the stage's final weights into `model` (and model.pt): the best checkpoint, or the last
    step's weights, or the mean of the last average_last checkpoints (the last one is the last
    step)."""
    path = os.path.join(out_dir, "model.pt")
    if cfg.final_model == "last":
        model.load_state_dict(average_state_dicts(
            step_checkpoint_paths(out_dir)[-cfg.average_last:]))
        if is_main():
            save_checkpoint(model, out_dir, **meta)
    else:
        model.load_state_dict(torch.load(path, map_location=cfg.device, weights_only=True))
    model.eval()
    return model


def remove_loop_files(out_dir):
    """A finished stage no longer needs its loop's resume state and periodic checkpoints."""
    for path in [os.path.join(out_dir, "resume.pt")] + step_checkpoint_paths(out_dir):
        if os.path.isfile(path):
            os.remove(path)


def train_model(model, train_pairs, valid_pairs, cfg: TrainConfig, out_dir, desc="train",
                meta=None):
    """Train `model` on id pairs; keep the stage's model (cfg.final_model: the last step's weights,
    their mean with earlier checkpoints, or the lowest validation loss) in out_dir as model.pt +
    config.json and return the model with those weights (in eval mode) and a summary dict.
    out_dir/resume.pt holds the loop's state at every validation and at Ctrl-C: a later call with
    the same out_dir continues from it and reaches the same weights as an uninterrupted run."""
    check_pairs(train_pairs, valid_pairs, desc)
    os.makedirs(out_dir, exist_ok=True)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, inverse_sqrt(cfg.warmup))
    # Resume: weights, optimizer moments, schedule, RNG and the position in the batch stream all
    # come back, so the remaining steps are exactly those an uninterrupted run would take.
    resume_path = os.path.join(out_dir, "resume.pt")
    position = restore_resume_state(resume_path, model, optimizer, scheduler)
    if position["step"]:
        print(f"{desc}: resuming at step {position['step']} of {cfg.steps_for(model.cfg.kind)}")
    meta = dict(meta or {}, train=asdict(cfg))
    with graceful_interrupt() as interrupt:
        training_loop(model, optimizer, scheduler, position, train_pairs, valid_pairs, cfg, out_dir,
                      desc, meta, interrupt)
    # the other processes read what rank 0 saved
    barrier()
    model = finish_model(model, out_dir, cfg, meta)
    valid = (position["best"] if cfg.final_model == "best"
             else validation_loss(model, valid_pairs, cfg))
    return model, {"steps": position["step"], "valid_loss": valid,
                   "tokens_per_s": position["tokens"] / max(position["seconds"], 1e-9),
                   "parameters": count_parameters(model)}


def training_loop(model, optimizer, scheduler, position, train_pairs, valid_pairs, cfg, out_dir,
                  desc, meta, interrupt):
    """The steps from `position` to the end: one update per step; every valid_every steps (and at
    the last) a validation, a checkpoint and the resume state. Raises Stopped after the step during
    which any process saw Ctrl-C, its state saved."""
    steps, resume_path = cfg.steps_for(model.cfg.kind), os.path.join(out_dir, "resume.pt")
    # +1: <bos>/<eos> or the summary slot
    lengths = [max(len(s), len(t)) + 1 for s, t in train_pairs]
    batches = remaining_batches(lengths, cfg, position)
    model.train()                                                   # dropout on
    net = compiled(data_parallel(model), cfg)
    bar = progress_bar(total=steps, initial=position["step"], desc=desc, disable=not is_main())
    while position["step"] < steps:
        start = time.perf_counter()
        micro_batches = [collate([train_pairs[i] for i in batch], cfg.device)
                         for batch in update_batches(batches, cfg)]
        loss, n_tokens = train_step(net, optimizer, scheduler, micro_batches, cfg, desc, out_dir,
                                    position["step"] + 1)
        position["step"] += 1
        position["tokens"] += n_tokens
        position["seconds"] += time.perf_counter() - start
        # refresh=False: the bar redraws at its own interval, not at every step
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{position['tokens'] / position['seconds']:.0f}",
                        refresh=False)
        bar.update(1)
        # Every process must agree to stop at the same step, or DDP's next all-reduce would hang.
        done, stop = position["step"] >= steps, any_rank(interrupt["stop"])
        if done or position["step"] % cfg.valid_every == 0:
            # dropout off, then on again
            valid = validation_loss(model, valid_pairs, cfg)
            keep_checkpoint(model, out_dir, cfg, position["step"], valid < position["best"], meta)
            position["best"] = min(position["best"], valid)
            bar.write(f"{desc}: step {position['step']}  train loss {loss:.3f}  "
                      f"valid loss {valid:.3f}  best {position['best']:.3f}")
        if (done or stop or position["step"] % cfg.valid_every == 0) and is_main():
            save_resume_state(resume_path, model, optimizer, scheduler, position)
        if stop:
            bar.close()
            raise Stopped(f"stopped at step {position['step']} of {desc}; run the same command "
                          f"again to resume")
    bar.close()


# ----- torchrun: one process per device ----------------------------------------------------------
def process_device(name):
    """The device of this process: under torchrun on CUDA, the GPU of its local rank, whatever GPU
    the command line named (each process owns one)."""
    device = pick_device(name)
    if distributed() and torch.device(device).type == "cuda":
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def start_processes(device_name):
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL on CUDA, gloo on CPU. The
    timeout is long because the other processes wait while rank 0 alone learns the BPE or evaluates
    a stage."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return
    cuda = torch.device(pick_device(device_name)).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    torch.distributed.init_process_group("nccl" if cuda else "gloo",
                                         timeout=datetime.timedelta(hours=6))


def stop_processes():
    if distributed():
        torch.distributed.destroy_process_group()


# `python train.py` runs the whole EM pipeline: em_nat.py's command line, run as `python -m em_nat`
# would run it. em_nat imports this file as the module `train`; registered under that name first,
# this running copy (the module __main__) is the one it gets, so the file is loaded once. Run by
# name, em_nat is the program, not a module the training loop imports.
if __name__ == "__main__":
    sys.modules["train"] = sys.modules["__main__"]
    runpy.run_module("em_nat", run_name="__main__", alter_sys=True)
