"""The classroom exercises grade what they claim to (tests/student_copy.py writes the copies):
- for every exercise, in a copy where only that exercise is cut out, its grading tests fail and
  every other exercise's grading tests pass; in the reference project they all pass. An exercise
  whose grading tests passed on the stub would grade nothing; one whose stub broke another's tests
  would grade unfairly;
- a student who starts from a copy with every exercise cut out and solves them one by one sees
  grading pass exactly for the exercises solved so far;
- a trial as a student would write them: plausible wrong solutions (MUTATIONS, at least six an
  exercise) fail their exercise's grading, right solutions written otherwise than the reference
  (RIGHT_SOLUTIONS, at least two an exercise) pass it;
- the copy holds no answer (no line of a cut-out solution or of the tests' references survives
  anywhere in it), no teacher tool and, unless asked, no expected figures; its README says how to
  grade.
The gradings run in two worker interpreters (`python tests/test_classroom.py JOBS.json`, see
run_gradings) that import torch once and each graded copy afresh.
This file is a teacher tool: it does not ship in a copy."""
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pytest

from student_copy import (MODULES, MarkerError, ROOT, TEACHER_FILES, check_shipped_doc,
                          exercise_regions, list_exercises, stub_file, shipped_test_files,
                          stub_functions, write_student_copy)


# ----- grading many copies, a few interpreters -------------------------------------------------
JOB_SECONDS = 120           # a grading that runs longer (a solution that never ends) stops there
                            # and fails


def run_gradings(jobs_file):
    """A worker (`python tests/test_classroom.py JOBS.json`): runs the grading of every job of the
    file ({dir, exercises, report}), one after another in this interpreter. torch is imported once;
    the project's modules and tests are imported afresh for every job (each job grades another copy
    of the project), on one thread (two workers share two cores). Writes each job's report
    ({nodeid: {exercises, passed}}: the copy's conftest writes it) and JOBS.json.seconds."""
    import signal
    import time
    import numpy, sacrebleu, torch, tqdm                        # noqa: F401 (kept for every job)
    torch.set_num_threads(1)
    torch.set_num_threads = lambda n: None                      # the test modules ask for 2
    sys.dont_write_bytecode = True                              # copies are written, then imported
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]

    def too_long(signum, frame):
        raise TimeoutError(f"a grading ran over {JOB_SECONDS} s")
    signal.signal(signal.SIGALRM, too_long)
    with open(jobs_file) as f:
        jobs = json.load(f)
    seconds = []
    for job in jobs:
        start, path, cwd = time.time(), list(sys.path), os.getcwd()
        os.environ["EM_NAT_GRADE_REPORT"] = job["report"]
        os.chdir(job["dir"])
        signal.alarm(JOB_SECONDS)
        try:
            pytest.main(["-q", "--tb=line", "-p", "no:cacheprovider",   # a line per failure: fast
                         *[f"--exercise={n}" for n in job["exercises"]],
                         "tests"])          # the copy's conftest skips the files that grade none
        finally:
            signal.alarm(0)
            os.chdir(cwd)
            sys.path[:] = path
            # Forget the copy's own modules (its top level and tests/), never an installed
            # package: a virtual environment inside the project (as CI makes) holds torch, which
            # cannot be imported twice in one interpreter.
            own = {os.path.abspath(job["dir"]), os.path.join(os.path.abspath(job["dir"]), "tests")}
            for name, module in list(sys.modules.items()):
                file = getattr(module, "__file__", None)
                in_copy = bool(file) and os.path.dirname(os.path.abspath(file)) in own
                if name == "conftest" or (in_copy and name != "__main__"):
                    del sys.modules[name]
        seconds.append(time.time() - start)
    with open(jobs_file + ".seconds", "w") as f:
        json.dump(seconds, f)


def grade_many(jobs, tmp_path, workers=2):
    """Grade (project directory, exercises) jobs in `workers` interpreters side by side. Returns
    their reports ({nodeid: {exercises, passed}}; {} where none was written) and seconds, in job
    order."""
    tagged = [dict(dir=str(d), exercises=list(e), report=str(tmp_path / f"report-{i}.json"),
                   index=i)
              for i, (d, e) in enumerate(jobs)]
    parts = [tagged[w::workers] for w in range(workers)]

    def work(w):
        jobs_file = str(tmp_path / f"jobs-{w}.json")
        with open(jobs_file, "w") as f:
            json.dump(parts[w], f)
        log = tmp_path / f"worker-{w}.log"
        with open(log, "w") as f:
            subprocess.run([sys.executable, os.path.abspath(__file__), jobs_file], cwd=ROOT,
                           stdout=f, stderr=subprocess.STDOUT,
                           env=dict(os.environ, OMP_NUM_THREADS="1"),
                           timeout=60 + JOB_SECONDS * len(parts[w]))
        assert os.path.exists(jobs_file + ".seconds"), (f"grading worker {w} stopped:\n"
                                                        f"{log.read_text()[-3000:]}")
        with open(jobs_file + ".seconds") as f:
            return json.load(f)

    with ThreadPoolExecutor(workers) as pool:
        part_seconds = list(pool.map(work, range(workers)))
    seconds = [0.0] * len(jobs)
    for part, times in zip(parts, part_seconds):
        for job, t in zip(part, times):
            seconds[job["index"]] = t
    reports = []
    for job in tagged:
        try:
            with open(job["report"]) as f:
                reports.append(json.load(f))
        except FileNotFoundError:
            reports.append({})
    return reports, seconds


def test_every_exercise_is_graded_by_its_own_tests_only(tmp_path):
    exercises = list(list_exercises())
    assert len(exercises) >= 7
    copies = {}
    for n in exercises:
        copies[n] = tmp_path / f"without-{n}"
        write_student_copy(str(copies[n]), [n])
    reports, _ = grade_many([(ROOT, exercises)] + [(copies[n], exercises) for n in exercises],
                            tmp_path)
    reference, graded = reports[0], dict(zip(exercises, reports[1:]))
    assert reference and all(t["passed"] for t in reference.values()), reference
    for n in exercises:
        own = [t for t in reference if n in reference[t]["exercises"]]
        assert own, f"exercise {n} has no grading test"
        report = graded[n]
        assert set(report) == set(reference)
        still_passing = [t for t in own if report[t]["passed"]]
        assert not still_passing, (f"exercise {n}: these grading tests pass on the stub: "
                                   f"{still_passing}")
        broken = [t for t in report if n not in report[t]["exercises"] and not report[t]["passed"]]
        assert not broken, f"cutting out exercise {n} breaks the grading of others: {broken}"


def test_a_stub_names_its_exercise_and_the_rest_of_the_file_is_unchanged(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    x = 1\n    # >>> exercise 3: a thing\n    return x + 1\n"
                      "    # <<< exercise 3\n\n\ndef g():\n    return 2\n")
    assert stub_file(str(source), {3}) == ("def f():\n    x = 1\n"
                                           "    raise NotImplementedError(\"exercise 3 (a thing): "
                                           "write this part; README 'Exercises' says what, and "
                                           "`python -m pytest --exercise 3` grades it\")\n"
                                           "\n\ndef g():\n    return 2\n")
    assert stub_file(str(source), {4}) == source.read_text()
    source.write_text("    # >>> exercise 3: a thing\n    return 1\n")
    with pytest.raises(MarkerError, match="m.py:1: exercise 3 is never closed"):
        stub_file(str(source), {3})


def test_the_full_student_copy_imports_and_runs_its_untouched_parts(tmp_path):
    write_student_copy(str(tmp_path / "copy"))
    code = ("import decode, em_nat, torch; from model import PAD\n"
            "print(decode.length_penalty(torch.tensor(3), 1.0).item())\n"
            "try:\n    decode.odd_viterbi(torch.zeros(1, 2, 5), torch.tensor([2]))\n"
            "except NotImplementedError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "copy", capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "1.3333333730697632"
    assert out.stdout.splitlines()[1].startswith("exercise 4 (ODD Viterbi): write this part")


def test_a_student_solving_the_exercises_one_by_one_passes_exactly_the_solved_ones(tmp_path):
    # The student's copy cuts out every exercise; the solutions come back one at a time from the
    # reference (the modules only: the tests' references stay out, as for a real student).
    exercises = list(list_exercises())
    copy = tmp_path / "copy"
    write_student_copy(str(copy))
    stages = [exercises[:i] for i in range(len(exercises) + 1)]          # solved so far
    dirs = []
    for solved in stages:
        stage_dir = tmp_path / f"solved-{len(solved)}"
        shutil.copytree(copy, stage_dir)
        for name in MODULES:
            (stage_dir / name).write_text(stub_file(os.path.join(ROOT, name),
                                                    set(exercises) - set(solved)),
                                          encoding="utf-8")
        dirs.append(stage_dir)
    reports, _ = grade_many([(d, exercises) for d in dirs], tmp_path)
    for solved, report in zip(stages, reports):
        assert report
        wrong = {t: r for t, r in report.items()
                 if r["passed"] != (set(r["exercises"]) <= set(solved))}
        assert not wrong, (f"solved {solved}: these grading tests pass on a stub or fail on a "
                           f"solution: {wrong}")


# ----- solutions written as a student would ------------------------------------------------------
class Solution(NamedTuple):
    """A solution of one exercise: the reference modules of the exercise with `changes` made, each
    (module, reference text, new text), the reference text once in its module. cls: which gap a
    wrong solution probes: (a) a batch, (b) a boundary (a limit, a tie, an empty input), (c) a
    property the docstring states, (d) something a grading test might repair, or "train/eval"."""
    exercise: int
    cls: str
    what: str
    changes: tuple


def read_module(module):
    with open(os.path.join(ROOT, module), encoding="utf-8") as f:
        return f.read()


def region(module, exercise, number=0):
    """The reference text of the `number`-th region of `exercise` in `module`, between its
    markers."""
    lines = read_module(module).split("\n")
    spans = [(first, last) for n, _, _, first, last in exercise_regions(os.path.join(ROOT, module))
             if n == exercise]
    first, last = spans[number]
    return "\n".join(lines[first + 1:last]) + "\n"


def span(module, first, last):
    """The reference text of `module` from `first` to the next `last`, both included."""
    text = read_module(module)
    start = text.index(first)
    return text[start:text.index(last, start) + len(last)]


# The reference regions of the exercises that live in decoding code (model.py's ar_step, decode.py)
# as they were at the time of this trial: solutions of these exercises are edits of these texts,
# and replace the whole region, so that they stay the same student solutions when the reference's
# own code there changes (a faster reference, say). {(module, exercise, region number): text}
TRIAL_REGIONS = {
    ("model.py", 3, 0): """\
        pos = self.tgt_pos.weight[step] * math.sqrt(self.cfg.d_model)
        x = self.embed_scaled(token[:, None]) + pos                      # (batch, 1, d)
        enc_mask = attention_mask(enc_keep)
        for layer, layer_cache in zip(self.decoder, cache):
            x = layer(x, enc, enc_mask, cache=layer_cache)
        return self.output_logits(x, banned=True)[:, 0]
""",
    ("decode.py", 4, 0): """\
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
""",
    ("decode.py", 5, 0): """\
    start = (center - beam // 2).clamp(min=1).clamp(max=max(max_len - beam + 1, 1))
    return (start[:, None] + torch.arange(beam, device=center.device)).clamp(max=max_len)
""",
    ("decode.py", 5, 1): """\
    return rescorer.score(src, tokens) / length_penalty(lengths + 1, alpha)
""",
    ("decode.py", 6, 0): """\
    n, k, steps = state.scores.size(0), beam, state.fin_tokens.size(2)
    log_norm = logits.logsumexp(dim=1, keepdim=True)                      # (n * beam, 1) \
softmax normaliser
    if step >= state.shortest_limit:                                       # a host int: no sync
        # At the length limit only <eos> may follow, with its real log-probability (same \
normaliser).
        logits = allow_only_eos(logits, (step >= state.max_len).repeat_interleave(k)[:, None])
    cand, origin, token = best_extensions(state.scores, logits, log_norm, 2 * k)   # (n, 2k) each
    ends = token == EOS
    # Ended extensions: their prefix (without <bos>) and normalised score, merged into the \
finished set.
    prefix = state.tokens.view(n, k, -1)[:, :, 1:].gather(1, origin[..., None].expand(-1, -1, step))
    ended = F.pad(prefix, (0, steps - step), value=PAD)                    # (n, 2k, steps)
    ended_scores = (cand / length_penalty(step + 1, alpha)).masked_fill(~ends, NEG_INF)
    fin_scores, pick = torch.cat([state.fin_scores, ended_scores], 1).topk(k, dim=1)   # (n, k)
    fin_tokens = torch.cat([state.fin_tokens, ended], 1).gather(1, \
pick[..., None].expand(-1, -1, steps))
    # Live: the k best extensions that do not end.
    scores, pick = cand.masked_fill(ends, NEG_INF).topk(k, dim=1)         # (n, k)
    rows = (origin.gather(1, pick) + torch.arange(n, device=origin.device)[:, None] * k).view(-1)
    tokens = torch.cat([state.tokens.index_select(0, rows), token.gather(1, pick).view(-1, 1)], \
dim=1)
    # Exact stop test: log-probabilities only fall as a hypothesis grows and the penalty grows \
with its
    # length, so no extension of a live hypothesis can score above (best live raw score) / \
(penalty of the
    # longest allowed output). Once that cannot beat the k-th finished score, the sentence is done.
    done = scores[:, 0] / state.bound <= fin_scores[:, -1]
    scores = scores.masked_fill(done[:, None], NEG_INF)
    return replace(state, tokens=tokens, scores=scores, fin_tokens=fin_tokens, \
fin_scores=fin_scores), rows
""",
}


def solution_modules(solution):
    """{module: text} of the modules that hold the solution's exercise (and any other it changes):
    the reference ones with the solution's changes. A change within a region of TRIAL_REGIONS is
    made on that region's trial text, which then replaces the reference's region; any other change
    is made on the reference text."""
    names = {place.split(":")[0] for place in list_exercises()[solution.exercise][1]}
    texts = {name: read_module(name) for name in names}
    edited = {}
    for name, old, new in solution.changes:
        texts.setdefault(name, read_module(name))
        trial = [key for key, text in TRIAL_REGIONS.items()
                 if key[:2] == (name, solution.exercise) and edited.get(key, text).count(old) == 1]
        if trial:
            edited[trial[0]] = edited.get(trial[0], TRIAL_REGIONS[trial[0]]).replace(old, new)
        else:
            assert texts[name].count(old) == 1, f"{solution.what}: {old!r} is not once in {name}"
            texts[name] = texts[name].replace(old, new)
    for (name, exercise, number), text in edited.items():
        texts[name] = texts[name].replace(region(name, exercise, number), text)
    return texts


def wrong(exercise, cls, what, module, old, new):
    return Solution(exercise, cls, what, ((module, old, new),))


# Plausible wrong solutions, each of which must fail its exercise's grading.
MUTATIONS = [
    # 1: the length classifier and its loss
    wrong(1, "c", "the length from the mean over all slots, not slot 0", "model.py",
          "return self.length_head(enc[:, 0])", "return self.length_head(enc.mean(1))"),
    wrong(1, "c", "the length from the last slot", "model.py",
          "return self.length_head(enc[:, 0])", "return self.length_head(enc[:, -1])"),
    wrong(1, "train/eval", "dropout on slot 0 before the length head", "model.py",
          "return self.length_head(enc[:, 0])", "return self.length_head(self.drop(enc[:, 0]))"),
    wrong(1, "a", ".squeeze() drops the batch dimension of a batch of one", "model.py",
          "return self.length_head(enc[:, 0])", "return self.length_head(enc[:, :1]).squeeze()"),
    wrong(1, "c", "label smoothing fixed at 0.1", "model.py",
          "label_smoothing=self.cfg.label_smoothing)", "label_smoothing=0.1)"),
    wrong(1, "c", "no label smoothing", "model.py",
          "lengths,\n                               label_smoothing=self.cfg.label_smoothing)",
          "lengths)"),
    wrong(1, "c", "the smoothing spread over the other classes only, by hand", "model.py",
          region("model.py", 1, 1),
          "        logp = self.length_logits(enc).float().log_softmax(-1)\n"
          "        eps, true = self.cfg.label_smoothing, "
          "logp.gather(1, lengths[:, None]).squeeze(1)\n"
          "        others = (logp.sum(-1) - true) / (logp.size(-1) - 1)\n"
          "        return (-(1 - eps) * true - eps * others).mean()\n"),
    wrong(1, "a", "the loss summed over the sentences", "model.py",
          "label_smoothing=self.cfg.label_smoothing)",
          "label_smoothing=self.cfg.label_smoothing, reduction=\"sum\")"),
    wrong(1, "b", "length classes counted from 1 (T - 1)", "model.py",
          "lengths,\n                               label_smoothing=self.cfg.label_smoothing)",
          "lengths - 1, label_smoothing=self.cfg.label_smoothing)"),
    # (a second blind trial)
    wrong(1, "b", "length 0 thought impossible: lengths clamped to >= 1", "model.py",
          "lengths,\n                               label_smoothing=self.cfg.label_smoothing)",
          "lengths.clamp(min=1),\n"
          "                               label_smoothing=self.cfg.label_smoothing)"),
    # (a third blind trial)
    wrong(1, "c", "the loss computed under no_grad: its value right, no gradient at all", "model.py",
          "        return F.cross_entropy(self.length_logits(enc).float(), lengths,",
          "        with torch.no_grad():\n"
          "            logits = self.length_logits(enc).float()\n"
          "        return F.cross_entropy(logits, lengths,"),
    wrong(1, "c", "slot 0 detached in length_logits: the encoder never learns the length",
          "model.py", "return self.length_head(enc[:, 0])",
          "return self.length_head(enc[:, 0].detach())"),
    wrong(1, "c", "the encoder output detached in the loss", "model.py",
          "self.length_logits(enc).float()", "self.length_logits(enc.detach()).float()"),
    wrong(1, "c", "no float32 cast (a bf16 model's loss in bf16)", "model.py",
          "self.length_logits(enc).float()", "self.length_logits(enc)"),
    # 2: the NAR decoder's input
    wrong(2, "train/eval", "no dropout", "model.py",
          "x = self.drop(pos[None].expand(lengths.size(0), t, -1) * keep[..., None])",
          "x = pos[None].expand(lengths.size(0), t, -1) * keep[..., None]"),
    wrong(2, "train/eval", "F.dropout with its default training=True: dropout in eval mode too",
          "model.py",
          "x = self.drop(pos[None].expand(lengths.size(0), t, -1) * keep[..., None])",
          "x = F.dropout(pos[None].expand(lengths.size(0), t, -1) * keep[..., None], "
          "self.cfg.dropout)"),
    wrong(2, "c", "the dropout rate fixed at 0.1", "model.py",
          "x = self.drop(pos[None].expand(lengths.size(0), t, -1) * keep[..., None])",
          "x = F.dropout(pos[None].expand(lengths.size(0), t, -1) * keep[..., None], "
          "0.1, self.training)"),
    wrong(2, "b", "positions counted from 1", "model.py",
          "pos = self.tgt_pos(torch.arange(t, device=lengths.device))",
          "pos = self.tgt_pos(torch.arange(1, t + 1, device=lengths.device))"),
    wrong(2, "c", "positions not scaled by sqrt(d)", "model.py",
          "pos = self.tgt_pos(torch.arange(t, device=lengths.device)) "
          "* math.sqrt(self.cfg.d_model)",
          "pos = self.tgt_pos(torch.arange(t, device=lengths.device))"),
    wrong(2, "c", "no mask: positions past the length kept", "model.py",
          "x = self.drop(pos[None].expand(lengths.size(0), t, -1) * keep[..., None])",
          "x = self.drop(pos[None].expand(lengths.size(0), t, -1))"),
    wrong(2, "a", "the first sentence's mask for every sentence", "model.py",
          "x = self.drop(pos[None].expand(lengths.size(0), t, -1) * keep[..., None])",
          "x = self.drop(pos[None].expand(lengths.size(0), t, -1) * keep[:1, :, None])"),
    wrong(2, "c", "the <pad> embedding as the placeholder", "model.py",
          "x = self.drop(pos[None].expand(lengths.size(0), t, -1) * keep[..., None])",
          "x = self.drop((self.embed_scaled(torch.zeros_like(lengths)[:, None]) + pos) "
          "* keep[..., None])"),
    wrong(2, "b", "the mask one position too long (i <= T)", "model.py",
          "x = self.drop(pos[None].expand(lengths.size(0), t, -1) * keep[..., None])",
          "x = self.drop(pos * (torch.arange(t, device=lengths.device)[None] "
          "<= lengths[:, None])[..., None])"),
    wrong(2, "a", "one dropout mask shared by every sentence of the batch", "model.py",
          "x = self.drop(pos[None].expand(lengths.size(0), t, -1) * keep[..., None])",
          "x = self.drop(pos)[None] * keep[..., None]"),
    wrong(2, "a", "max_tgt_len ignored: as many positions as the longest length", "model.py",
          region("model.py", 2),
          "        n = int(lengths.max())\n"
          "        pos = self.tgt_pos(torch.arange(n, device=lengths.device)) "
          "* math.sqrt(self.cfg.d_model)\n"
          "        x = self.drop(pos[None] * padding_mask(lengths, n)[..., None])\n"),
    # 3: the cached AR decoding step
    wrong(3, "d", "the never-emitted tokens not banned", "model.py",
          "return self.output_logits(x, banned=True)[:, 0]", "return self.output_logits(x)[:, 0]"),
    wrong(3, "train/eval", "F.dropout on the input with training left at True", "model.py",
          "x = self.embed_scaled(token[:, None]) + pos                      # (batch, 1, d)",
          "x = F.dropout(self.embed_scaled(token[:, None]) + pos, self.cfg.dropout)"),
    wrong(3, "b", "the position of the next token (step + 1)", "model.py",
          "pos = self.tgt_pos.weight[step] * math.sqrt(self.cfg.d_model)",
          "pos = self.tgt_pos.weight[step + 1] * math.sqrt(self.cfg.d_model)"),
    wrong(3, "c", "the position not scaled", "model.py",
          "pos = self.tgt_pos.weight[step] * math.sqrt(self.cfg.d_model)",
          "pos = self.tgt_pos.weight[step]"),
    wrong(3, "a", "encoder rows tiled for the hypotheses (repeat, not one per sentence)",
          "model.py",
          "        enc_mask = attention_mask(enc_keep)\n"
          "        for layer, layer_cache in zip(self.decoder, cache):",
          "        group = token.size(0) // enc.size(0)\n"
          "        enc, enc_keep = enc.repeat(group, 1, 1), enc_keep.repeat(group, 1)\n"
          "        enc_mask = attention_mask(enc_keep)\n"
          "        for layer, layer_cache in zip(self.decoder, cache):"),
    wrong(3, "a", "encoder rows copied for every hypothesis row (the cross cache by hypothesis)",
          "model.py",
          "        enc_mask = attention_mask(enc_keep)\n"
          "        for layer, layer_cache in zip(self.decoder, cache):",
          "        group = token.size(0) // enc.size(0)\n"
          "        enc, enc_keep = enc.repeat_interleave(group, 0), "
          "enc_keep.repeat_interleave(group, 0)\n"
          "        enc_mask = attention_mask(enc_keep)\n"
          "        for layer, layer_cache in zip(self.decoder, cache):"),
    wrong(3, "c", "the source padding attended (no encoder mask)", "model.py",
          "            x = layer(x, enc, enc_mask, cache=layer_cache)",
          "            x = layer(x, enc, None, cache=layer_cache)"),
    wrong(3, "c", "no cache: each step sees only its own token", "model.py",
          "            x = layer(x, enc, enc_mask, cache=layer_cache)",
          "            x = layer(x, enc, enc_mask)"),
    wrong(3, "c", "the token embedding not scaled", "model.py",
          "x = self.embed_scaled(token[:, None]) + pos", "x = self.embed(token[:, None]) + pos"),
    # (a second blind trial)
    wrong(3, "c", "the position from the cache's size, not from step", "model.py",
          "pos = self.tgt_pos.weight[step] * math.sqrt(self.cfg.d_model)",
          "seen = cache[0][\"self\"][\"k\"].size(2) if \"k\" in cache[0][\"self\"] else 0\n"
          "        pos = self.tgt_pos.weight[seen] * math.sqrt(self.cfg.d_model)"),
    wrong(3, "b", "the step taken as a Python number only (full_like): the fast path passes "
          "a (1,) tensor", "model.py",
          "pos = self.tgt_pos.weight[step] * math.sqrt(self.cfg.d_model)",
          "pos = self.tgt_pos(torch.full_like(token, step))[:, None] * math.sqrt(self.cfg.d_model)"),
    wrong(3, "c", "the step read on the host (int(step)): a sync the fast path cannot record",
          "model.py", "pos = self.tgt_pos.weight[step] * math.sqrt(self.cfg.d_model)",
          "pos = self.tgt_pos.weight[int(step)] * math.sqrt(self.cfg.d_model)"),
    wrong(3, "a", ".squeeze() drops the row dimension of a single row", "model.py",
          "return self.output_logits(x, banned=True)[:, 0]",
          "return self.output_logits(x.squeeze(), banned=True)"),
    # 4: ODD Viterbi
    wrong(4, "c", "ODD over the top-2 tokens per position", "decode.py",
          "logp.topk(min(k, logp.size(-1)), dim=-1)", "logp.topk(min(2, logp.size(-1)), dim=-1)"),
    wrong(4, "c", "greedy, left to right: each position's best token unlike its left neighbour",
          "decode.py", region("decode.py", 4),
          "    n, t, _ = logp.shape\n"
          "    real = torch.arange(t, device=logp.device)[None, :] < lengths[:, None]\n"
          "    tokens, scores, prev = [], torch.zeros(n, device=logp.device), None\n"
          "    for s in range(t):\n"
          "        step = logp[:, s] if prev is None else "
          "logp[:, s].scatter(1, prev[:, None], float(\"-inf\"))\n"
          "        score, prev = step.max(-1)\n"
          "        scores += score.masked_fill(~real[:, s], 0.0)\n"
          "        tokens.append(prev)\n"
          "    return torch.stack(tokens, 1).masked_fill(~real, PAD), scores\n"),
    wrong(4, "b", "the back-pointers stacked into one tensor: nothing to stack at t = 1",
          "decode.py",
          "    path = [choice]\n    for arg_prev in reversed(backpointers):\n"
          "        choice = arg_prev.gather(1, choice[:, None]).squeeze(1)\n"
          "        path.append(choice)\n",
          "    back, path = torch.stack(backpointers, 1), [choice]                  "
          "# (batch, t-1, k)\n"
          "    for s in range(t - 2, -1, -1):\n"
          "        choice = back[:, s].gather(1, choice[:, None]).squeeze(1)\n"
          "        path.append(choice)\n"),
    wrong(4, "c", "the penalty as same * -inf (0 * -inf is nan)", "decode.py",
          "transition = (same & real[:, 1:, None, None]).float() * -1e9",
          "transition = (same & real[:, 1:, None, None]).float() * float(\"-inf\")"),
    wrong(4, "b", "positions past the length at -inf instead of free", "decode.py",
          "top_val = top_val.masked_fill(~real[..., None], 0.0)",
          "top_val = top_val.masked_fill(~real[..., None], float(\"-inf\"))"),
    wrong(4, "c", "tokens cut at the longest length, not t", "decode.py",
          "    return tokens.masked_fill(~real, PAD), score\n",
          "    return tokens.masked_fill(~real, PAD)[:, :int(lengths.max())], score\n"),
    wrong(4, "a", "each row's length ignored inside the Viterbi (only the output padded)",
          "decode.py",
          "    top_val = top_val.masked_fill(~real[..., None], 0.0)                   "
          "# past the end: free\n",
          ""),
    wrong(4, "c", "the score of each position's best token, not of the path", "decode.py",
          "    return tokens.masked_fill(~real, PAD), score\n",
          "    return tokens.masked_fill(~real, PAD), top_val[:, :, 0].sum(1)\n"),
    wrong(4, "a", "backtracking with the first row's pointers for every row", "decode.py",
          "        choice = arg_prev.gather(1, choice[:, None]).squeeze(1)",
          "        choice = arg_prev[0][choice]"),
    # (a third blind trial)
    wrong(4, "c", "the caller's logp masked in place past each length", "decode.py",
          "    n, t, _ = logp.shape\n",
          "    n, t, _ = logp.shape\n"
          "    past = torch.arange(t, device=logp.device)[None, :] >= lengths[:, None]\n"
          "    logp.masked_fill_(past[..., None], 0.0)\n"),
    # 5: the length window and NPD rescoring
    wrong(5, "b", "the window starts (B - 1) // 2 below the centre", "decode.py",
          "start = (center - beam // 2)", "start = (center - (beam - 1) // 2)"),
    wrong(5, "b", "no shift at the upper edge: the lengths clamped (duplicates)", "decode.py",
          "start = (center - beam // 2).clamp(min=1).clamp(max=max(max_len - beam + 1, 1))",
          "start = (center - beam // 2).clamp(min=1)"),
    wrong(5, "b", "the lower edge clamped after the offsets (duplicates of 1)", "decode.py",
          region("decode.py", 5),
          "    lengths = center[:, None] - beam // 2 + torch.arange(beam, device=center.device)\n"
          "    return lengths.clamp(min=1, max=max_len)\n"),
    wrong(5, "b", "shifted one too far at the upper edge (max_len - B)", "decode.py",
          ".clamp(max=max(max_len - beam + 1, 1))", ".clamp(max=max(max_len - beam, 1))"),
    wrong(5, "a", "the first sentence's window for the whole batch", "decode.py",
          region("decode.py", 5),
          "    start = (center[:1] - beam // 2).clamp(min=1)"
          ".clamp(max=max(max_len - beam + 1, 1))\n"
          "    return (start[:, None] + torch.arange(beam, device=center.device))"
          ".expand(center.size(0), -1)\n"),
    wrong(5, "a", "Python ints: right for one sentence only", "decode.py", region("decode.py", 5),
          "    start = min(max(int(center) - beam // 2, 1), max(max_len - beam + 1, 1))\n"
          "    return torch.arange(start, start + beam, device=center.device)[None]\n"),
    wrong(5, "c", "lengths as floats", "decode.py",
          "torch.arange(beam, device=center.device)).clamp(max=max_len)",
          "torch.arange(beam, device=center.device, dtype=torch.float)).clamp(max=max_len)"),
    wrong(5, "b", "the NPD penalty without <eos>", "decode.py",
          "length_penalty(lengths + 1, alpha)", "length_penalty(lengths, alpha)"),
    wrong(5, "a", "the NPD penalty of the padded width for every row", "decode.py",
          "length_penalty(lengths + 1, alpha)", "length_penalty(tokens.size(1) + 1, alpha)"),
    wrong(5, "d", "the rescorer given (tokens, src)", "decode.py",
          "return rescorer.score(src, tokens) /", "return rescorer.score(tokens, src) /"),
    wrong(5, "c", "alpha fixed at 1", "decode.py",
          "length_penalty(lengths + 1, alpha)", "length_penalty(lengths + 1, 1.0)"),
    # 6: beam search with a finished set
    wrong(6, "a", "rows without the sentence offset", "decode.py",
          "rows = (origin.gather(1, pick) + torch.arange(n, device=origin.device)[:, None] * k)"
          ".view(-1)",
          "rows = origin.gather(1, pick).view(-1)"),
    wrong(6, "a", "right tokens, but the returned rows without the sentence offset", "decode.py",
          "fin_scores=fin_scores), rows\n", "fin_scores=fin_scores), rows % k\n"),
    wrong(6, "c", "the cache never reordered", "decode.py",
          "        model.reorder_cache(cache, rows)\n",
          "        pass                                  # never reordered\n"),
    wrong(6, "c", "the normaliser taken after <eos> is forced", "decode.py",
          "cand, origin, token = best_extensions(state.scores, logits, log_norm, 2 * k)",
          "cand, origin, token = best_extensions(state.scores, logits, "
          "logits.logsumexp(1, keepdim=True), 2 * k)"),
    wrong(6, "c", "the stop bound: the penalty of max_len tokens, without <eos>", "decode.py",
          "done = scores[:, 0] / state.bound <= fin_scores[:, -1]",
          "done = scores[:, 0] / length_penalty(state.max_len, alpha) <= fin_scores[:, -1]"),
    wrong(6, "c", "the stop bound: the penalty of the live hypotheses' own length (+ <eos>)",
          "decode.py",
          "done = scores[:, 0] / state.bound <= fin_scores[:, -1]",
          "done = scores[:, 0] / length_penalty(step + 2, alpha) <= fin_scores[:, -1]"),
    wrong(6, "a", "the stop bound of the batch's longest limit for every sentence", "decode.py",
          "done = scores[:, 0] / state.bound <= fin_scores[:, -1]",
          "done = scores[:, 0] / length_penalty(steps, alpha) <= fin_scores[:, -1]"),
    wrong(6, "b", "a tie keeps searching (<)", "decode.py",
          "done = scores[:, 0] / state.bound <= fin_scores[:, -1]",
          "done = scores[:, 0] / state.bound < fin_scores[:, -1]"),
    wrong(6, "c", "the stop test on raw scores", "decode.py",
          "done = scores[:, 0] / state.bound <= fin_scores[:, -1]",
          "done = scores[:, 0] <= fin_scores[:, -1]"),
    wrong(6, "c", "the stop test against the best finished score, not the k-th", "decode.py",
          "done = scores[:, 0] / state.bound <= fin_scores[:, -1]",
          "done = scores[:, 0] / state.bound <= fin_scores[:, 0]"),
    wrong(6, "c", "a done sentence marks only its first live slot", "decode.py",
          "scores = scores.masked_fill(done[:, None], NEG_INF)",
          "scores[:, 0] = scores[:, 0].masked_fill(done, NEG_INF)"),
    wrong(6, "a", "every sentence forced to end once the shortest reaches its limit", "decode.py",
          "logits = allow_only_eos(logits, (step >= state.max_len).repeat_interleave(k)[:, None])",
          "logits = allow_only_eos(logits, torch.ones_like(logits[:, :1], dtype=torch.bool))"),
    wrong(6, "c", "finished hypotheses ranked by raw log-probability", "decode.py",
          "ended_scores = (cand / length_penalty(step + 1, alpha)).masked_fill(~ends, NEG_INF)",
          "ended_scores = cand.masked_fill(~ends, NEG_INF)"),
    wrong(6, "b", "the finished score's penalty without the <eos>", "decode.py",
          "(cand / length_penalty(step + 1, alpha))", "(cand / length_penalty(step, alpha))"),
    wrong(6, "c", "live hypotheses from the k best extensions only", "decode.py",
          "best_extensions(state.scores, logits, log_norm, 2 * k)",
          "best_extensions(state.scores, logits, log_norm, k)"),
    # (a second blind trial)
    wrong(6, "a", "a done sentence signalled only once every sentence of the batch is done",
          "decode.py", "scores = scores.masked_fill(done[:, None], NEG_INF)",
          "scores = scores.masked_fill(done.all(), NEG_INF)"),
    # (a third blind trial)
    wrong(6, "c", "every live hypothesis's <eos> extension finishes, not only those of the 2k best",
          "decode.py",
          "    prefix = state.tokens.view(n, k, -1)[:, :, 1:].gather(1, origin[..., None].expand(-1, "
          "-1, step))\n"
          "    ended = F.pad(prefix, (0, steps - step), value=PAD)                    # (n, 2k, steps)\n"
          "    ended_scores = (cand / length_penalty(step + 1, alpha)).masked_fill(~ends, NEG_INF)\n",
          "    eos_scores = state.scores + (logits[:, EOS:EOS + 1] - log_norm).view(n, k)\n"
          "    ended = F.pad(state.tokens.view(n, k, -1)[:, :, 1:], (0, steps - step), value=PAD)\n"
          "    ended_scores = eos_scores / length_penalty(step + 1, alpha)\n"),
    wrong(6, "c", "the stop test against the finished set from before this step's merge",
          "decode.py", "done = scores[:, 0] / state.bound <= fin_scores[:, -1]",
          "done = scores[:, 0] / state.bound <= state.fin_scores[:, -1]"),
    # 7: the E-step's selection
    wrong(7, "b", "ties to the last candidate", "em_nat.py",
          "picks = [max(range(len(row)), key=row.__getitem__) for row in scores]",
          "picks = [len(row) - 1 - max(range(len(row)), key=row[::-1].__getitem__) "
          "for row in scores]"),
    wrong(7, "b", "ties to the larger index, by max over (score, index)", "em_nat.py",
          "picks = [max(range(len(row)), key=row.__getitem__) for row in scores]",
          "picks = [max(zip(row, range(len(row))))[1] for row in scores]"),
    wrong(7, "c", "a length-normalised score", "model.py",
          "return len_logp.gather(1, lengths[:, None]).squeeze(1) + tok.sum(1)\n",
          "return (len_logp.gather(1, lengths[:, None]).squeeze(1) + tok.sum(1)) / lengths\n"),
    wrong(7, "c", "no length term", "model.py",
          "return len_logp.gather(1, lengths[:, None]).squeeze(1) + tok.sum(1)\n",
          "return tok.sum(1)\n"),
    wrong(7, "b", "empty candidates scored", "em_nat.py",
          "if 0 < len(cand) <= nar_model.cfg.max_len]", "if len(cand) <= nar_model.cfg.max_len]"),
    wrong(7, "b", "a candidate of exactly max_len tokens not scored", "em_nat.py",
          "if 0 < len(cand) <= nar_model.cfg.max_len]",
          "if 0 < len(cand) < nar_model.cfg.max_len]"),
    wrong(7, "a", "the padding of shorter targets scored", "model.py",
          ".squeeze(-1).masked_fill(tgt == PAD, 0.0)\n", ".squeeze(-1)\n"),
    wrong(7, "a", "the first sentence's length distribution for every sentence", "model.py",
          "return len_logp.gather(1, lengths[:, None]).squeeze(1) + tok.sum(1)\n",
          "return len_logp[0, lengths] + tok.sum(1)\n"),
    wrong(7, "b", "the length term of T - 1", "model.py",
          "len_logp.gather(1, lengths[:, None])", "len_logp.gather(1, lengths[:, None] - 1)"),
    wrong(7, "b", "too-long candidates skipped when scoring, but not when the scores come back",
          "em_nat.py",
          span("em_nat.py", "    flat = [(i, j) for i, cands", "    return scores\n"),
          "    pairs = [(src, cand) for src, cands in zip(sources, sets) for cand in cands\n"
          "             if 0 < len(cand) <= nar_model.cfg.max_len]\n"
          "    flat = iter(nar_scores(run, nar_model, pairs))\n"
          "    return [[next(flat) if cand else float(\"-inf\") for cand in cands] "
          "for cands in sets]\n"),
    wrong(7, "c", "scored by hand with decoding_log_probs (the special tokens masked)", "em_nat.py",
          span("em_nat.py", "    flat = [(i, j) for i, cands", "    return scores\n"),
          "    scores = []\n"
          "    for src, cands in zip(sources, sets):\n"
          "        enc, keep = nar_model.encode(torch.tensor([src]))\n"
          "        len_logp = nar_model.length_logits(enc).float().log_softmax(-1)[0]\n"
          "        row = []\n"
          "        for cand in cands:\n"
          "            if 0 < len(cand) <= nar_model.cfg.max_len:\n"
          "                logits = nar_model.nar_logits(torch.tensor([len(cand)]), enc, keep)[0]\n"
          "                logp = nar_model.decoding_log_probs(logits)\n"
          "                row.append(float(len_logp[len(cand)] "
          "+ logp[range(len(cand)), cand].sum()))\n"
          "            else:\n"
          "                row.append(float(\"-inf\"))\n"
          "        scores.append(row)\n"
          "    return scores\n"),
    wrong(7, "b", "a set with nothing scorable: no candidate picked", "em_nat.py",
          span("em_nat.py", "    picks = [max(range(len(row))", "zip(scores, picks)]\n"),
          "    selected, best_scores = [], []\n"
          "    for cands, row in zip(sets, scores):\n"
          "        pick, best = None, float(\"-inf\")\n"
          "        for j, score in enumerate(row):\n"
          "            if score > best:\n"
          "                pick, best = j, score\n"
          "        selected.append(cands[pick])\n"
          "        best_scores.append(best)\n"
          "    return selected, best_scores\n"),
    # (a second blind trial)
    wrong(7, "train/eval", "Transformer.score called directly: no eval mode, no run precision",
          "em_nat.py",
          "    flat_scores = nar_scores(run, nar_model, [(sources[i], sets[i][j]) for i, j in flat])",
          "    from data import pad_batch\n"
          "    flat_scores = nar_model.score(\n"
          "        pad_batch([sources[i] for i, _ in flat], run.device),\n"
          "        pad_batch([sets[i][j] for i, j in flat], run.device)).tolist() if flat else []"),
    wrong(7, "c", "score_pairs without the run's precision", "em_nat.py",
          "    flat_scores = nar_scores(run, nar_model, [(sources[i], sets[i][j]) for i, j in flat])",
          "    flat_scores = score_pairs(nar_model, [(sources[i], sets[i][j]) for i, j in flat],\n"
          "                              run.decode_tokens, run.device)"),
]

# Exercise 8's solutions replace the whole loop (so that they do not depend on how the reference
# spells its E-step call): a student's loop, and variants of it.
EM_LOOP = """    real = [t for _, t in run.train_ids]
    ar = run.stage("ar", "ar", "real data", lambda: real)
    run.stage("nar-raw", "nar", "real data", lambda: real, rescorer=ar)
    nar = run.stage("nar-kd", "nar", "KD", lambda: first_distillation_targets(run, ar.model()),
                    rescorer=ar)
    for i in range(1, run.em.iterations + 1):
        prev_ar, prev_nar = ar, nar
        ar = run.stage(f"em{i}-ar", "ar", "E-step",
                       lambda: run.e_step(f"em{i}-ar", prev_ar, prev_nar, i),
                       init_from=prev_ar)
        nar = run.stage(f"em{i}-nar", "nar", "M-step", lambda: distil(run, ar.model()),
                        init_from=prev_nar, rescorer=ar)
    return run.results
"""


def loop(what, cls, *edits):
    """A wrong solution of exercise 8: EM_LOOP with `edits` (old, new) made."""
    text = EM_LOOP
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return wrong(8, cls, what, "em_nat.py", region("em_nat.py", 8), text)


MUTATIONS += [
    # 8: the EM loop
    loop("the first NAR model always distilled (--distillation-targets ignored)", "c",
         ("lambda: first_distillation_targets(run, ar.model())",
          "lambda: distil(run, ar.model())")),
    loop("targets computed before run.stage asks for them", "c",
         ("    nar = run.stage(\"nar-kd\", \"nar\", \"KD\", "
          "lambda: first_distillation_targets(run, ar.model()),",
          "    kd = first_distillation_targets(run, ar.model())\n"
          "    nar = run.stage(\"nar-kd\", \"nar\", \"KD\", lambda: kd,"),
         ("        ar = run.stage(f\"em{i}-ar\", \"ar\", \"E-step\",\n"
          "                       lambda: run.e_step(f\"em{i}-ar\", prev_ar, prev_nar, i),\n",
          "        targets = run.e_step(f\"em{i}-ar\", prev_ar, prev_nar, i)\n"
          "        ar = run.stage(f\"em{i}-ar\", \"ar\", \"E-step\", lambda: targets,\n")),
    loop("models loaded as soon as their stage returns", "c",
         ("        prev_ar, prev_nar = ar, nar\n",
          "        prev_ar, prev_nar = ar, nar\n"
          "        ar_model, nar_model = ar.model(), nar.model()\n"),
         ("prev_ar, prev_nar, i)", "ar_model, nar_model, i)")),
    loop("every NAR stage rescored by AR_0", "c",
         ("    ar = run.stage(\"ar\", \"ar\", \"real data\", lambda: real)\n",
          "    ar = ar_0 = run.stage(\"ar\", \"ar\", \"real data\", lambda: real)\n"),
         ("init_from=prev_nar, rescorer=ar)", "init_from=prev_nar, rescorer=ar_0)")),
    loop("the raw NAR baseline not rescored", "c",
         ("lambda: real, rescorer=ar)", "lambda: real)")),
    loop("NAR_0 selects and is the start of every iteration", "b",
         ("    nar = run.stage(\"nar-kd\"", "    nar = nar_0 = run.stage(\"nar-kd\""),
         ("prev_ar, prev_nar = ar, nar\n", "prev_ar, prev_nar = ar, nar_0\n")),
    loop("iterations counted from 0", "b",
         ("range(1, run.em.iterations + 1)", "range(run.em.iterations)")),
    loop("the M-step distils AR_{i-1}", "c",
         ("lambda: distil(run, ar.model())", "lambda: distil(run, prev_ar.model())")),
    loop("AR_i trained from scratch", "c",
         ("                       init_from=prev_ar)", "                       )")),
    loop("the E-step's iteration number one too low", "b", ("prev_nar, i)", "prev_nar, i - 1)")),
]

# Exercise 9's wrong solutions: the simple version (recount after every merge) and the incremental
# one, each with a plausible slip.
SIMPLE_BPE = """    words = {tuple(w[:-1]) + (w[-1] + END,): n for w, n in word_counts.items()}
    merges = []
    while len(merges) < num_merges:
        counts = Counter()
        for symbols, n in words.items():
            for pair in word_pairs(symbols):
                counts[pair] += n
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        if counts[pair] < 2:
            break
        merges.append(pair)
        words = {merge_symbols(symbols, pair): n for symbols, n in words.items()}
    return merges
"""


def bpe(what, cls, *edits):
    """A wrong solution of exercise 9: SIMPLE_BPE with `edits` (old, new) made."""
    text = SIMPLE_BPE
    for old, new in edits:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return wrong(9, cls, what, "data.py", region("data.py", 9), text)


MUTATIONS += [
    # 9: learning BPE merges
    bpe("the hint's simple version with Counter.most_common (ties: the first counted)", "b",
        ("pair = min(counts, key=lambda p: (-counts[p], p))",
         "pair = counts.most_common(1)[0][0]")),
    bpe("ties to the largest pair", "b",
        ("pair = min(counts, key=lambda p: (-counts[p], p))",
         "pair = max(counts, key=lambda p: (counts[p], p))")),
    bpe("overlapping occurrences counted once per word", "b",
        ("for pair in word_pairs(symbols):", "for pair in set(word_pairs(symbols)):")),
    bpe("each word counted once, whatever its count", "c",
        ("counts[pair] += n", "counts[pair] += 1")),
    bpe("merging goes on with pairs seen once", "b",
        ("if counts[pair] < 2:", "if counts[pair] < 1:")),
    bpe("no merge asked, one made (the number checked after merging)", "b",
        ("    while len(merges) < num_merges:\n", "    while True:\n"),
        ("        merges.append(pair)\n",
         "        merges.append(pair)\n"
         "        if len(merges) == num_merges:\n"
         "            break\n")),
    wrong(9, "c", "merged by replacing text in space-joined words (across symbol boundaries)",
          "data.py", region("data.py", 9),
          "    words = {\" \".join(w[:-1]) + \" \" + w[-1] + END: n "
          "for w, n in word_counts.items()}\n"
          "    merges = []\n"
          "    while len(merges) < num_merges:\n"
          "        counts = Counter()\n"
          "        for word, n in words.items():\n"
          "            symbols = word.split()\n"
          "            for pair in zip(symbols, symbols[1:]):\n"
          "                counts[pair] += n\n"
          "        if not counts:\n"
          "            break\n"
          "        pair = min(counts, key=lambda p: (-counts[p], p))\n"
          "        if counts[pair] < 2:\n"
          "            break\n"
          "        merges.append(pair)\n"
          "        words = {word.replace(\" \".join(pair), \"\".join(pair)): n "
          "for word, n in words.items()}\n"
          "    return merges\n"),
    wrong(9, "b", "the end marker a symbol of its own", "data.py",
          "words = [tuple(w[:-1]) + (w[-1] + END,) for w in word_counts]",
          "words = [tuple(w) + (END,) for w in word_counts]"),
    wrong(9, "c", "the counts of the pairs a merge removes never lowered", "data.py",
          "            for p in word_pairs(old):\n                pair_count[p] -= freq\n",
          "            for p in word_pairs(old):\n"),
    wrong(9, "c", "stale heap entries not skipped", "data.py",
          "        if pair_count.get(pair, 0) != -neg_count:\n"
          "            continue                                  "
          "# stale entry: the count changed since\n",
          ""),
    wrong(9, "c", "the words of new pairs not recorded", "data.py",
          "                pair_count[p] += freq\n                pair_words[p].add(index)\n",
          "                pair_count[p] += freq\n"),
    wrong(9, "b", "one merge too many", "data.py",
          "len(merges) < num_merges", "len(merges) <= num_merges"),
]

# Right solutions written otherwise than the reference, each of which must pass its exercise's
# grading (the reference itself is graded beside them, as a check of this test).
# A fourth blind trial's escapes: tensors made on the CPU beside the model's device (caught on the
# "meta" device), positions that never learn, a finite penalty for a repeat, the E-step's two
# models swapped, and the caller's word counts consumed.
MUTATIONS += [
    wrong(2, "c", "the positions made on the CPU (torch.arange with no device)", "model.py",
          "pos = self.tgt_pos(torch.arange(t, device=lengths.device))",
          "pos = self.tgt_pos(torch.arange(t))"),
    wrong(2, "c", "the position embeddings detached: they never learn", "model.py",
          "pos = self.tgt_pos(torch.arange(t, device=lengths.device))",
          "pos = self.tgt_pos(torch.arange(t, device=lengths.device)).detach()"),
    wrong(3, "c", "an int step made into a CPU tensor (torch.as_tensor with no device)",
          "model.py", "pos = self.tgt_pos.weight[step] * math.sqrt(self.cfg.d_model)",
          "pos = self.tgt_pos(torch.as_tensor(step).view(1)) * math.sqrt(self.cfg.d_model)"),
    wrong(4, "c", "the length mask made on the CPU", "decode.py",
          "real = torch.arange(t, device=logp.device)[None, :] < lengths[:, None]",
          "real = torch.arange(t)[None, :] < lengths[:, None]"),
    wrong(4, "c", "a finite penalty (-1e4) for a repeat", "decode.py",
          "transition = (same & real[:, 1:, None, None]).float() * -1e9",
          "transition = (same & real[:, 1:, None, None]).float() * -1e4"),
    wrong(5, "c", "the window's offsets made on the CPU", "decode.py",
          "torch.arange(beam, device=center.device)", "torch.arange(beam)"),
    loop("e_step given the NAR model before the AR model", "c",
         ('run.e_step(f"em{i}-ar", prev_ar, prev_nar, i)',
          'run.e_step(f"em{i}-ar", prev_nar, prev_ar, i)')),
    bpe("the caller's word_counts emptied while reading them", "c",
        ("words = {tuple(w[:-1]) + (w[-1] + END,): n for w, n in word_counts.items()}",
         "words = {tuple(w[:-1]) + (w[-1] + END,): word_counts.pop(w) for w in list(word_counts)}")),
]


RIGHT_SOLUTIONS = [
    Solution(1, "", "a loop over sentences; the smoothed loss by hand", (
        ("model.py", region("model.py", 1, 0),
         "        return torch.stack([self.length_head.weight @ enc[i, 0] "
         "for i in range(enc.size(0))])\n"),
        ("model.py", region("model.py", 1, 1),
         "        eps, losses = self.cfg.label_smoothing, []\n"
         "        for logits, length in zip(self.length_logits(enc).float(), lengths.tolist()):\n"
         "            logp = logits.log_softmax(-1)\n"
         "            losses.append(-(1 - eps) * logp[length] - eps * logp.mean())\n"
         "        return torch.stack(losses).mean()\n"))),
    Solution(1, "", "a matrix product; nll_loss plus the smoothing term", (
        ("model.py", region("model.py", 1, 0),
         "        return enc[:, 0] @ self.length_head.weight.T\n"),
        ("model.py", region("model.py", 1, 1),
         "        logp = self.length_logits(enc).float().log_softmax(-1)\n"
         "        eps = self.cfg.label_smoothing\n"
         "        return (1 - eps) * F.nll_loss(logp, lengths) - eps * logp.mean(-1).mean()\n"))),
    Solution(1, "", "length log-probabilities as the logits", (
        ("model.py", region("model.py", 1, 0),
         "        return self.length_head(enc[:, 0]).log_softmax(-1)\n"),)),
    Solution(2, "", "a loop over sentences, zeros past the length by padding", (
        ("model.py", region("model.py", 2),
         "        pos = self.tgt_pos.weight[:t] * math.sqrt(self.cfg.d_model)\n"
         "        rows = [F.pad(pos[:n], (0, 0, 0, t - n)) for n in lengths.tolist()]\n"
         "        x = self.drop(torch.stack(rows))\n"),)),
    Solution(2, "", "dropout first, then the mask by masked_fill", (
        ("model.py", region("model.py", 2),
         "        pos = self.tgt_pos(torch.arange(t, device=lengths.device)) "
         "* math.sqrt(self.cfg.d_model)\n"
         "        x = self.drop(pos.expand(lengths.size(0), t, -1))"
         ".masked_fill(~keep[..., None], 0.0)\n"),)),
    Solution(3, "", "written like ar_states (with self.drop); the ban added after the output "
             "layer", (
        ("model.py", region("model.py", 3),
         "        at = torch.as_tensor(step, device=token.device).reshape(1, 1)\n"
         "        pos = self.tgt_pos(at) * math.sqrt(self.cfg.d_model)\n"
         "        x = self.drop(self.embed(token)[:, None] * math.sqrt(self.cfg.d_model) + pos)\n"
         "        for layer, layer_cache in zip(self.decoder, cache):\n"
         "            x = layer(x, enc, attention_mask(enc_keep), cache=layer_cache)\n"
         "        return self.output_logits(x)[:, -1] + self.banned\n"),)),
    Solution(3, "", "log-probabilities (decoding_log_probs) instead of logits", (
        ("model.py", region("model.py", 3),
         "        x = self.embed_scaled(token[:, None]) "
         "+ self.tgt_pos.weight[step] * math.sqrt(self.cfg.d_model)\n"
         "        enc_mask = attention_mask(enc_keep)\n"
         "        for i, layer in enumerate(self.decoder):\n"
         "            x = layer(x, enc, enc_mask, cache=cache[i])\n"
         "        return self.decoding_log_probs(self.output_logits(x))[:, 0]\n"),)),
    Solution(4, "", "a Python loop per row over the whole vocabulary", (
        ("decode.py", region("decode.py", 4),
         "    n, t, v = logp.shape\n"
         "    tokens = torch.full((n, t), PAD, dtype=torch.long, device=logp.device)\n"
         "    scores = torch.zeros(n, device=logp.device)\n"
         "    for row, table in enumerate(logp.tolist()):\n"
         "        length, best, back = int(lengths[row]), list(table[0]), []\n"
         "        for s in range(1, length):\n"
         "            first, second = sorted(range(v), key=lambda y: -best[y])[:2]\n"
         "            pointer = [second if y == first else first for y in range(v)]\n"
         "            back.append(pointer)\n"
         "            best = [best[pointer[y]] + table[s][y] for y in range(v)]\n"
         "        y = max(range(v), key=lambda y: best[y])\n"
         "        scores[row], path = best[y], [y]\n"
         "        for pointer in reversed(back):\n"
         "            y = pointer[y]\n"
         "            path.append(y)\n"
         "        tokens[row, :length] = torch.tensor(path[::-1])\n"
         "    return tokens, scores\n"),)),
    Solution(4, "", "vectorised over the whole vocabulary, the repeat forbidden on the diagonal", (
        ("decode.py", region("decode.py", 4),
         "    n, t, v = logp.shape\n"
         "    real = torch.arange(t, device=logp.device)[None, :] < lengths[:, None]\n"
         "    logp = logp.masked_fill(~real[..., None], 0.0)\n"
         "    same = torch.eye(v, dtype=torch.bool, device=logp.device)\n"
         "    delta, back = logp[:, 0], []\n"
         "    for s in range(1, t):\n"
         "        moves = delta[:, :, None].masked_fill(same & real[:, s, None, None], "
         "float(\"-inf\"))\n"
         "        best, arg = moves.max(1)                                    # (batch, vocab)\n"
         "        delta = best + logp[:, s]\n"
         "        back.append(arg)\n"
         "    score, y = delta.max(1)\n"
         "    path = [y]\n"
         "    for arg in reversed(back):\n"
         "        y = arg.gather(1, y[:, None]).squeeze(1)\n"
         "        path.append(y)\n"
         "    return torch.stack(path[::-1], 1).masked_fill(~real, PAD), score\n"),)),
    Solution(5, "", "a loop over sentences with Python min and max; the penalty written out", (
        ("decode.py", region("decode.py", 5, 0),
         "    rows = []\n"
         "    for c in center.tolist():\n"
         "        start = max(1, min(c - beam // 2, max_len - beam + 1))\n"
         "        rows.append(list(range(start, start + beam)))\n"
         "    return torch.tensor(rows, device=center.device)\n"),
        ("decode.py", region("decode.py", 5, 1),
         "    scores = rescorer.score(src, tokens)\n"
         "    return scores / ((5.0 + lengths + 1) / 6.0) ** alpha\n"))),
    Solution(5, "", "the window returned as int32 (integer lengths of another width)", (
        ("decode.py",
         "    return (start[:, None] + torch.arange(beam, device=center.device)).clamp(max=max_len)\n",
         "    window = start[:, None] + torch.arange(beam, device=center.device)\n"
         "    return window.clamp(max=max_len).to(torch.int32)\n"),)),
    Solution(5, "", "the window's last length clamped first", (
        ("decode.py", region("decode.py", 5, 0),
         "    end = (center - beam // 2 + beam - 1).clamp(min=beam, max=max_len)\n"
         "    return end[:, None] - torch.arange(beam - 1, -1, -1, device=center.device)\n"),
        ("decode.py", region("decode.py", 5, 1),
         "    penalty = length_penalty(lengths.float() + 1, alpha)\n"
         "    return rescorer.score(src, tokens).float() / penalty\n"))),
    Solution(6, "", "a loop over sentences on lists", (
        ("decode.py", region("decode.py", 6),
         "    n, k, steps = state.scores.size(0), beam, state.fin_tokens.size(2)\n"
         "    logp = logits.log_softmax(dim=1)                  # each row normalised as given\n"
         "    tokens = torch.full((n * k, step + 2), PAD, dtype=state.tokens.dtype, "
         "device=logits.device)\n"
         "    scores = torch.full((n, k), NEG_INF, device=logits.device)\n"
         "    fin_tokens, fin_scores = state.fin_tokens.clone(), state.fin_scores.clone()\n"
         "    rows = torch.arange(n * k, device=logits.device)\n"
         "    for i in range(n):\n"
         "        at_limit, options = step >= int(state.max_len[i]), []     "
         "# (raw score, row, token)\n"
         "        for j in range(k):\n"
         "            row, parent = i * k + j, float(state.scores[i, j])\n"
         "            for token, lp in enumerate(logp[row].tolist()):\n"
         "                if parent > NEG_INF and lp > NEG_INF "
         "and (token == EOS or not at_limit):\n"
         "                    options.append((parent + lp, row, token))\n"
         "        options = sorted(options, key=lambda o: -o[0])[:2 * k]\n"
         "        finished = [(s, fin_tokens[i, j].clone()) "
         "for j, s in enumerate(fin_scores[i].tolist())\n"
         "                    if s > NEG_INF]\n"
         "        for score, row, token in options:\n"
         "            if token == EOS:\n"
         "                output = F.pad(state.tokens[row, 1:], (0, steps - step), value=PAD)\n"
         "                finished.append((score / length_penalty(step + 1, alpha), output))\n"
         "        for j, (score, output) in enumerate(sorted(finished, key=lambda f: -f[0])[:k]):\n"
         "            fin_scores[i, j], fin_tokens[i, j] = score, output\n"
         "        live = [o for o in options if o[2] != EOS][:k]\n"
         "        for j, (score, row, token) in enumerate(live):\n"
         "            rows[i * k + j], scores[i, j] = row, score\n"
         "            tokens[i * k + j] = torch.cat([state.tokens[row], "
         "state.tokens.new_tensor([token])])\n"
         "        if live and live[0][0] / float(state.bound[i]) <= float(fin_scores[i, -1]):\n"
         "            scores[i] = NEG_INF\n"
         "    state = replace(state, tokens=tokens, scores=scores, fin_tokens=fin_tokens, "
         "fin_scores=fin_scores)\n"
         "    return state, rows\n"),)),
    Solution(6, "", "a full log-softmax, sort instead of topk, the stop test multiplied out", (
        ("decode.py",
         "    cand, origin, token = best_extensions(state.scores, logits, log_norm, 2 * k)   "
         "# (n, 2k) each\n",
         "    logp = ((logits - log_norm).view(n, k, -1) + state.scores[:, :, None]).view(n, -1)\n"
         "    cand, flat = logp.sort(dim=1, descending=True)\n"
         "    cand, flat = cand[:, :2 * k], flat[:, :2 * k]\n"
         "    origin, token = flat // logits.size(1), flat % logits.size(1)\n"),
        ("decode.py",
         "    fin_scores, pick = torch.cat([state.fin_scores, ended_scores], 1).topk(k, dim=1)   "
         "# (n, k)\n",
         "    fin_scores, pick = torch.cat([state.fin_scores, ended_scores], 1)"
         ".sort(dim=1, descending=True)\n"
         "    fin_scores, pick = fin_scores[:, :k], pick[:, :k]\n"),
        ("decode.py", "    done = scores[:, 0] / state.bound <= fin_scores[:, -1]\n",
         "    done = scores[:, 0] <= fin_scores[:, -1] * state.bound\n"))),
    Solution(7, "", "every candidate scored by hand, sentence by sentence", (
        ("em_nat.py", span("em_nat.py", "    flat = [(i, j) for i, cands", "    return scores\n"),
         "    from model import precision_context\n"
         "    nar_model.eval()\n"
         "    scores = []\n"
         "    for src, cands in zip(sources, sets):\n"
         "        row = []\n"
         "        for cand in cands:\n"
         "            if not 0 < len(cand) <= nar_model.cfg.max_len:\n"
         "                row.append(float(\"-inf\"))\n"
         "                continue\n"
         "            with torch.no_grad(), precision_context(run.device, run.precision):\n"
         "                enc, keep = nar_model.encode(torch.tensor([src]))\n"
         "                len_logp = nar_model.length_logits(enc).float()"
         ".log_softmax(-1)[0, len(cand)]\n"
         "                logp = nar_model.nar_logits(torch.tensor([len(cand)]), enc, keep)"
         ".float().log_softmax(-1)[0]\n"
         "            row.append(float(len_logp + logp[torch.arange(len(cand)), "
         "torch.tensor(cand)].sum()))\n"
         "        scores.append(row)\n"
         "    return scores\n"),)),
    Solution(7, "", "torch.where and indexing; nar_scores once per set; a loop of comparisons", (
        ("model.py", region("model.py", 7),
         "        picked = logp.gather(2, tgt.unsqueeze(2)).squeeze(2)\n"
         "        tok = torch.where(tgt != PAD, picked, torch.zeros_like(picked))\n"
         "        return tok.sum(-1) "
         "+ len_logp[torch.arange(tgt.size(0), device=tgt.device), lengths]\n"),
        ("em_nat.py", span("em_nat.py", "    flat = [(i, j) for i, cands", "    return scores\n"),
         "    scores = []\n"
         "    for src, cands in zip(sources, sets):\n"
         "        ok = [j for j, cand in enumerate(cands) "
         "if 1 <= len(cand) <= nar_model.cfg.max_len]\n"
         "        row = [float(\"-inf\")] * len(cands)\n"
         "        for j, score in zip(ok, nar_scores(run, nar_model, "
         "[(src, cands[j]) for j in ok])):\n"
         "            row[j] = score\n"
         "        scores.append(row)\n"
         "    return scores\n"),
        ("em_nat.py", span("em_nat.py", "    picks = [max(range(len(row))",
                           "zip(scores, picks)]\n"),
         "    selected, best_scores = [], []\n"
         "    for cands, row in zip(sets, scores):\n"
         "        pick = 0\n"
         "        for j in range(1, len(row)):\n"
         "            if row[j] > row[pick]:\n"
         "                pick = j\n"
         "        selected.append(cands[pick])\n"
         "        best_scores.append(row[pick])\n"
         "    return selected, best_scores\n"))),
    Solution(7, "", "the score summed sentence by sentence; torch's argmax (the first of equal "
             "ones)", (
        ("model.py", region("model.py", 7),
         "        scores = []\n"
         "        for row in range(tgt.size(0)):\n"
         "            n = int(lengths[row])\n"
         "            picked = logp[row, torch.arange(n, device=tgt.device), tgt[row, :n]]\n"
         "            scores.append(len_logp[row, n] + picked.sum())\n"
         "        return torch.stack(scores)\n"),
        ("em_nat.py", "    picks = [max(range(len(row)), key=row.__getitem__) for row in scores]\n",
         "    picks = [int(torch.tensor(row).argmax()) for row in scores]\n"))),
    Solution(8, "", "inner functions, a while loop, --distillation-targets read directly", (
        ("em_nat.py", region("em_nat.py", 8),
         "    real = [target for _, target in run.train_ids]\n"
         "    ar = run.stage(\"ar\", \"ar\", \"real data\", lambda: real)\n"
         "    run.stage(\"nar-raw\", \"nar\", \"real data\", lambda: real, rescorer=ar)\n"
         "    path = run.cfg.data.distillation_targets\n"
         "\n"
         "    def kd_targets():\n"
         "        if path is not None:\n"
         "            return run.read_distillation_targets(path)\n"
         "        return distil(run, ar.model())\n"
         "    nar = run.stage(\"nar-kd\", \"nar\", \"KD\", kd_targets, rescorer=ar)\n"
         "    i = 1\n"
         "    while i <= run.em.iterations:\n"
         "        def e_targets(ar=ar, nar=nar, i=i):\n"
         "            return run.e_step(f\"em{i}-ar\", ar, nar, i)\n"
         "        new_ar = run.stage(f\"em{i}-ar\", \"ar\", \"E-step\", e_targets, init_from=ar)\n"
         "\n"
         "        def m_targets(new_ar=new_ar):\n"
         "            return distil(run, new_ar.model())\n"
         "        nar = run.stage(f\"em{i}-nar\", \"nar\", \"M-step\", m_targets, "
         "init_from=nar, rescorer=new_ar)\n"
         "        ar, i = new_ar, i + 1\n"
         "    return run.results\n"),)),
    Solution(8, "", "lists of the stages' handles, indexed by iteration", (
        ("em_nat.py", region("em_nat.py", 8),
         "    real = [t for _, t in run.train_ids]\n"
         "    ars = [run.stage(\"ar\", \"ar\", \"real data\", lambda: real)]\n"
         "    run.stage(\"nar-raw\", \"nar\", \"real data\", lambda: list(real), rescorer=ars[0])\n"
         "    nars = [run.stage(\"nar-kd\", \"nar\", \"KD\", "
         "lambda: first_distillation_targets(run, ars[0].model()),\n"
         "                      rescorer=ars[0])]\n"
         "    for i in range(1, run.em.iterations + 1):\n"
         "        ars.append(run.stage(f\"em{i}-ar\", \"ar\", \"E-step\", "
         "init_from=ars[i - 1], make_targets=lambda:\n"
         "                             run.e_step(f\"em{i}-ar\", ars[i - 1], nars[i - 1], i)))\n"
         "        nars.append(run.stage(f\"em{i}-nar\", \"nar\", \"M-step\", "
         "lambda: distil(run, ars[i].model()),\n"
         "                              init_from=nars[i - 1], rescorer=ars[i]))\n"
         "    return run.results\n"),)),
    Solution(9, "", "the hint's simple version done right: recount after every merge", (
        ("data.py", region("data.py", 9), SIMPLE_BPE),)),
    Solution(9, "", "incremental without a heap: the words of every pair, a scan for the best", (
        ("data.py", region("data.py", 9),
         "    words = [list(w[:-1]) + [w[-1] + END] for w in word_counts]\n"
         "    freqs = list(word_counts.values())\n"
         "    counts, where = defaultdict(int), defaultdict(set)\n"
         "    for index, symbols in enumerate(words):\n"
         "        for pair in zip(symbols, symbols[1:]):\n"
         "            counts[pair] += freqs[index]\n"
         "            where[pair].add(index)\n"
         "    merges = []\n"
         "    while len(merges) < num_merges and counts:\n"
         "        pair = min(counts, key=lambda p: (-counts[p], p))\n"
         "        if counts[pair] < 2:\n"
         "            break\n"
         "        merges.append(pair)\n"
         "        for index in where.pop(pair):\n"
         "            old = tuple(words[index])\n"
         "            new = merge_symbols(old, pair)\n"
         "            for p in zip(old, old[1:]):\n"
         "                counts[p] -= freqs[index]\n"
         "                if counts[p] == 0:\n"
         "                    del counts[p]\n"
         "            for p in zip(new, new[1:]):\n"
         "                counts[p] += freqs[index]\n"
         "                where[p].add(index)\n"
         "            words[index] = list(new)\n"
         "    return merges\n"),)),
]


def grade_solutions(solutions, tmp_path):
    """Grade each solution in a copy with its exercise cut out and its exercise's modules the
    reference ones with the solution's changes. Returns the reports and seconds (grade_many)."""
    jobs = []
    for i, solution in enumerate(solutions):
        base = tmp_path / f"without-{solution.exercise}"
        if not base.exists():
            write_student_copy(str(base), [solution.exercise])
        copy = tmp_path / f"solution-{i}"
        shutil.copytree(base, copy)
        for name, text in solution_modules(solution).items():
            (copy / name).write_text(text, encoding="utf-8")
        jobs.append((copy, [solution.exercise]))
    return grade_many(jobs, tmp_path)


def test_every_exercise_has_wrong_and_right_solutions_to_grade():
    for n in list_exercises():
        assert sum(s.exercise == n for s in MUTATIONS) >= 6, \
            f"exercise {n}: fewer than 6 wrong solutions"
        assert sum(s.exercise == n for s in RIGHT_SOLUTIONS) >= 2, \
            f"exercise {n}: fewer than 2 right solutions"


def test_other_right_solutions_pass_their_exercise(tmp_path):
    references = [Solution(n, "", "the reference itself", ()) for n in list_exercises()]
    solutions = references + RIGHT_SOLUTIONS
    reports, _ = grade_solutions(solutions, tmp_path)
    failed = {f"exercise {s.exercise}: {s.what}":
              sorted(t for t, r in report.items() if not r["passed"]) or report
              for s, report in zip(solutions, reports)
              if not report or not all(r["passed"] for r in report.values())}
    assert not failed, f"right solutions that fail their grading: {failed}"


def test_wrong_solutions_fail_their_exercise(tmp_path):
    reports, _ = grade_solutions(MUTATIONS, tmp_path)
    for s, report in zip(MUTATIONS, reports):
        assert report, f"exercise {s.exercise}, {s.what}: no grading test ran"
    passing = [f"exercise {s.exercise} ({s.cls}): {s.what}" for s, report in zip(MUTATIONS, reports)
               if all(r["passed"] for r in report.values())]
    assert not passing, f"wrong solutions that pass their grading: {passing}"


def code_lines(path, regions):
    """The code lines (no comments, no blank or short lines) of `regions` of a file, less what a
    stub keeps on purpose (a module-level region's function signatures and docstrings)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    found = set()
    for _, _, indent, first, last in regions:
        kept = set() if indent else set(stub_functions(lines[first + 1:last], "", path))
        found |= {line.strip() for line in lines[first + 1:last]
                  if len(line.strip()) >= 24 and not line.strip().startswith("#")
                  and line not in kept}
    return found


NOT_ANSWERS = {"enc_mask = attention_mask(enc_keep)"}    # lines of a solution that the project
                                                         # also has elsewhere


def test_the_copy_holds_no_answer_no_teacher_tool_and_says_how_to_grade(tmp_path):
    copy = tmp_path / "copy"
    write_student_copy(str(copy))
    shipped = {p.relative_to(copy).as_posix(): p.read_text(encoding="utf-8")
               for p in copy.rglob("*") if p.is_file()}
    for tool in TEACHER_FILES:
        assert f"tests/{tool}" not in shipped
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        assert shipped["LICENSE"] == f.read()                    # the licence goes with every copy
    answers = set()
    for name in MODULES:
        answers |= code_lines(os.path.join(ROOT, name), exercise_regions(os.path.join(ROOT, name)))
    for name in shipped_test_files():
        answers |= code_lines(os.path.join(ROOT, "tests", name),
                              exercise_regions(os.path.join(ROOT, "tests", name)))
    answers -= NOT_ANSWERS
    assert len(answers) > 20
    leaks = [(path, line) for path, text in shipped.items() for line in answers
             if line in {l.strip() for l in text.split("\n")}]
    assert not leaks, f"lines of cut-out solutions or references found in the copy: {leaks}"
    readme = shipped["README.md"]
    for number, (title, _) in list_exercises().items():
        assert f"**Exercise {number}: {title}**" in readme
    assert "python -m pytest --exercise N" in readme and "student_copy" not in readme
    assert not re.search(r"Expected[ (:]|\d\.\d \[\d", readme)                # no expected figures
    assert "docs/method.md" in shipped and "## Map from the paper to the code" in readme
    assert not {"docs/results.md", "docs/classroom.md", "docs/reproducing.md"} & set(shipped)
    with_figures = tmp_path / "with-figures"
    write_student_copy(str(with_figures), [4], with_expected_figures=True)
    readme = (with_figures / "README.md").read_text(encoding="utf-8")
    assert "**Exercise 4: ODD Viterbi**: `decode.py` line" in readme and "Exercise 6" not in readme
    assert "docs/results.md" in readme
    assert (with_figures / "docs" / "results.md").read_text(encoding="utf-8").startswith(
        "> The expected figures")


def test_a_shipped_doc_must_be_true_in_the_copy():
    check_shipped_doc("docs/method.md", "The E-step picks within Q.\nSee `decode.odd_viterbi`.")
    for text in ("Expected: 88.3", "valid% 88.3 [83.7, 93.7]", "see docs/results.md",
                 "tests/student_copy.py", "between `# >>> exercise 4: ODD` markers",
                 "the classroom.md page"):
        with pytest.raises(MarkerError, match="docs/method.md:2: .* student copy"):
            check_shipped_doc("docs/method.md", "fine\n" + text)


def test_a_reference_in_a_test_file_becomes_a_skip(tmp_path):
    source = tmp_path / "test_m.py"
    source.write_text("import pytest\n\n\ndef slow():\n    # >>> exercise 3: a thing\n"
                      "    return 1\n    # <<< exercise 3\n")
    assert stub_file(str(source), {3}, is_test=True) == (
        "import pytest\n\n\ndef slow():\n"
        "    pytest.skip(\"the teacher's reference for exercise 3 (a thing) is "
        "not in the student copy, and this test needs it\")\n")
    source.write_text("def slow():\n    # >>> exercise 3: a thing\n    return 1\n"
                      "    # <<< exercise 3\n")
    with pytest.raises(MarkerError, match="does not import pytest"):
        stub_file(str(source), {3}, is_test=True)


if __name__ == "__main__":
    run_gradings(sys.argv[1])
