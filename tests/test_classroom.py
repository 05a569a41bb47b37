"""The classroom exercises grade what they claim to (tests/student_copy.py writes the copies):
- for every exercise, in a copy where only that exercise is cut out, its grading tests fail and every
  other exercise's grading tests pass; in the reference project they all pass. An exercise whose grading
  tests passed on the stub would grade nothing; one whose stub broke another's tests would grade unfairly;
- a student who starts from a copy with every exercise cut out and solves them one by one sees grading
  pass exactly for the exercises solved so far;
- plausible wrong solutions (MUTATIONS) fail their exercise's grading;
- the copy holds no answer (no line of a cut-out solution or of the tests' references survives anywhere
  in it), no teacher tool and, unless asked, no expected figures; its README says how to grade.
This file is a teacher tool: it does not ship in a copy."""
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from student_copy import (MODULES, MarkerError, ROOT, TEACHER_FILES, check_shipped_doc, exercise_regions,
                          list_exercises, stub_file, shipped_test_files, stub_functions, write_student_copy)


def grade(project_dir, report, exercises=None):
    """Run the grading tests of `exercises` (default: all) of `project_dir` in a fresh interpreter;
    {nodeid: {exercises, passed}}."""
    env = dict(os.environ, EM_NAT_GRADE_REPORT=str(report), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    subprocess.run(args + [f"--exercise={n}" for n in exercises or list_exercises(ROOT)], cwd=project_dir,
                   env=env, capture_output=True, timeout=600)
    with open(report) as f:
        return json.load(f)


def test_every_exercise_is_graded_by_its_own_tests_only(tmp_path):
    exercises = list(list_exercises())
    assert len(exercises) >= 7
    copies = {}
    for n in exercises:
        copies[n] = tmp_path / f"without-{n}"
        write_student_copy(str(copies[n]), [n])
    with ThreadPoolExecutor(2) as pool:
        reference = pool.submit(grade, ROOT, tmp_path / "reference.json")
        graded = {n: pool.submit(grade, copies[n], tmp_path / f"report-{n}.json") for n in exercises}
        reference, graded = reference.result(), {n: g.result() for n, g in graded.items()}
    assert reference and all(t["passed"] for t in reference.values()), reference
    for n in exercises:
        own = [t for t in reference if n in reference[t]["exercises"]]
        assert own, f"exercise {n} has no grading test"
        report = graded[n]
        assert set(report) == set(reference)
        still_passing = [t for t in own if report[t]["passed"]]
        assert not still_passing, f"exercise {n}: these grading tests pass on the stub: {still_passing}"
        broken = [t for t in report if n not in report[t]["exercises"] and not report[t]["passed"]]
        assert not broken, f"cutting out exercise {n} breaks the grading of others: {broken}"


def test_a_stub_names_its_exercise_and_the_rest_of_the_file_is_unchanged(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    x = 1\n    # >>> exercise 3: a thing\n    return x + 1\n"
                      "    # <<< exercise 3\n\n\ndef g():\n    return 2\n")
    assert stub_file(str(source), {3}) == ("def f():\n    x = 1\n    raise NotImplementedError(\"exercise 3 (a thing): "
                                           "write this part; README 'Exercises' says what, and `python -m pytest "
                                           "--exercise 3` grades it\")\n\n\ndef g():\n    return 2\n")
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
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "copy", capture_output=True, text=True)
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
            (stage_dir / name).write_text(stub_file(os.path.join(ROOT, name), set(exercises) - set(solved)),
                                          encoding="utf-8")
        dirs.append(stage_dir)
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda i: grade(dirs[i], tmp_path / f"report-{i}.json"), range(len(stages))))
    for solved, report in zip(stages, reports):
        assert report
        wrong = {t: r for t, r in report.items() if r["passed"] != (set(r["exercises"]) <= set(solved))}
        assert not wrong, f"solved {solved}: these grading tests pass on a stub or fail on a solution: {wrong}"


# Plausible wrong solutions: (exercise, what is wrong, module, reference text, the wrong text). The
# reference text must occur once in the module; the wrong text replaces it in a copy where only that
# exercise is cut out, which the exercise's grading must then fail.
MUTATIONS = [
    (4, "ODD over the top-2 tokens per position", "decode.py",
     "logp.topk(min(k, logp.size(-1)), dim=-1)", "logp.topk(min(2, logp.size(-1)), dim=-1)"),
    (6, "rows without the sentence offset", "decode.py",
     "rows = (origin.gather(1, pick) + torch.arange(n, device=origin.device)[:, None] * k).view(-1)",
     "rows = origin.gather(1, pick).view(-1)"),
    (6, "right tokens, but the returned rows without the sentence offset", "decode.py",
     "fin_scores=fin_scores), rows\n", "fin_scores=fin_scores), rows % k\n"),
    (6, "the cache never reordered", "decode.py",
     "        model.reorder_cache(cache, rows)\n", "        pass                                  # never reordered\n"),
    (6, "the normaliser taken after <eos> is forced", "decode.py",
     "cand, origin, token = best_extensions(state.scores, logits, log_norm, 2 * k)",
     "cand, origin, token = best_extensions(state.scores, logits, logits.logsumexp(1, keepdim=True), 2 * k)"),
    (7, "ties to the last candidate", "em_nat.py",
     "picks = [max(range(len(row)), key=row.__getitem__) for row in scores]",
     "picks = [len(row) - 1 - max(range(len(row)), key=row[::-1].__getitem__) for row in scores]"),
    (7, "a length-normalised score", "model.py",
     "return len_logp.gather(1, lengths[:, None]).squeeze(1) + tok.sum(1)\n",
     "return (len_logp.gather(1, lengths[:, None]).squeeze(1) + tok.sum(1)) / lengths\n"),
    (7, "no length term", "model.py",
     "return len_logp.gather(1, lengths[:, None]).squeeze(1) + tok.sum(1)\n", "return tok.sum(1)\n"),
    (7, "empty candidates scored", "em_nat.py",
     "if 0 < len(cand) <= nar_model.cfg.max_len]", "if len(cand) <= nar_model.cfg.max_len]"),
]

# Right solutions written another way than the reference, which the grading must accept:
# (exercise, what, module, reference text, the other solution).
BY_HAND_SCORE = """    scores = []
    for src, cands in zip(sources, sets):
        row = []
        for cand in cands:
            if not 0 < len(cand) <= nar_model.cfg.max_len:
                row.append(float("-inf"))
                continue
            enc, keep = nar_model.encode(torch.tensor([src]))
            len_logp = nar_model.length_logits(enc).float().log_softmax(-1)[0, len(cand)]
            logp = nar_model.nar_logits(torch.tensor([len(cand)]), enc, keep).float().log_softmax(-1)[0]
            row.append(float(len_logp + logp[torch.arange(len(cand)), torch.tensor(cand)].sum()))
        scores.append(row)
    return scores
"""
def test_other_right_solutions_pass_their_exercise(tmp_path):
    copy = tmp_path / "by-hand"
    write_student_copy(str(copy), [7])
    text = stub_file(os.path.join(ROOT, "em_nat.py"), set())
    start = text.index("    flat = [(i, j) for i, cands in enumerate(sets)")
    end = text.index("def best_candidates")
    (copy / "em_nat.py").write_text(text[:start] + BY_HAND_SCORE + "\n\n" + text[end:], encoding="utf-8")
    (copy / "model.py").write_text(stub_file(os.path.join(ROOT, "model.py"), set()), encoding="utf-8")
    report = grade(copy, tmp_path / "report.json", [7])
    assert report and all(r["passed"] for r in report.values()), report


def test_wrong_solutions_fail_their_exercise(tmp_path):
    dirs = []
    for i, (exercise, _, name, right, wrong) in enumerate(MUTATIONS):
        copy = tmp_path / f"mutation-{i}"
        write_student_copy(str(copy), [exercise])
        text = stub_file(os.path.join(ROOT, name), set())                 # the reference module
        assert text.count(right) == 1, f"mutation {i}: {right!r} is not once in {name}"
        (copy / name).write_text(text.replace(right, wrong), encoding="utf-8")
        dirs.append(copy)
    with ThreadPoolExecutor(2) as pool:
        reports = list(pool.map(lambda i: grade(dirs[i], tmp_path / f"report-{i}.json", [MUTATIONS[i][0]]),
                                range(len(MUTATIONS))))
    for (exercise, what, *_), report in zip(MUTATIONS, reports):
        assert report, f"exercise {exercise}, {what}: no grading test ran"
        assert not all(r["passed"] for r in report.values()), f"exercise {exercise}: {what} passes its grading"


def code_lines(path, regions):
    """The code lines (no comments, no blank or short lines) of `regions` of a file, less what a stub
    keeps on purpose (a module-level region's function signatures and docstrings)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    found = set()
    for _, _, indent, first, last in regions:
        kept = set() if indent else set(stub_functions(lines[first + 1:last], "", path))
        found |= {line.strip() for line in lines[first + 1:last]
                  if len(line.strip()) >= 24 and not line.strip().startswith("#") and line not in kept}
    return found


NOT_ANSWERS = {"enc_mask = attention_mask(enc_keep)"}    # lines of a solution that the project also has elsewhere


def test_the_copy_holds_no_answer_no_teacher_tool_and_says_how_to_grade(tmp_path):
    copy = tmp_path / "copy"
    write_student_copy(str(copy))
    shipped = {p.relative_to(copy).as_posix(): p.read_text(encoding="utf-8") for p in copy.rglob("*") if p.is_file()}
    for tool in TEACHER_FILES:
        assert f"tests/{tool}" not in shipped
    with open(os.path.join(ROOT, "LICENSE"), encoding="utf-8") as f:
        assert shipped["LICENSE"] == f.read()                    # the licence goes with every copy
    answers = set()
    for name in MODULES:
        answers |= code_lines(os.path.join(ROOT, name), exercise_regions(os.path.join(ROOT, name)))
    for name in shipped_test_files():
        answers |= code_lines(os.path.join(ROOT, "tests", name), exercise_regions(os.path.join(ROOT, "tests", name)))
    answers -= NOT_ANSWERS
    assert len(answers) > 20
    leaks = [(path, line) for path, text in shipped.items() for line in answers
             if line in {l.strip() for l in text.split("\n")}]
    assert not leaks, f"lines of cut-out solutions or references found in the copy: {leaks}"
    readme = shipped["README.md"]
    for number, (title, _) in list_exercises().items():
        assert f"**Exercise {number}: {title}**" in readme
    assert "python -m pytest --exercise N" in readme and "student_copy" not in readme
    assert not re.search(r"Expected[ (:]|\d\.\d \[\d", readme)                   # no expected figures
    assert "docs/method.md" in shipped and "## Map from the paper to the code" in readme
    assert not {"docs/results.md", "docs/classroom.md", "docs/reproducing.md"} & set(shipped)
    with_figures = tmp_path / "with-figures"
    write_student_copy(str(with_figures), [4], with_expected_figures=True)
    readme = (with_figures / "README.md").read_text(encoding="utf-8")
    assert "**Exercise 4: ODD Viterbi**: `decode.py` line" in readme and "Exercise 6" not in readme
    assert "docs/results.md" in readme
    assert (with_figures / "docs" / "results.md").read_text(encoding="utf-8").startswith("> The expected figures")


def test_a_shipped_doc_must_be_true_in_the_copy():
    check_shipped_doc("docs/method.md", "The E-step picks within Q.\nSee `decode.odd_viterbi`.")
    for text in ("Expected: 88.3", "valid% 88.3 [83.7, 93.7]", "see docs/results.md", "tests/student_copy.py",
                 "between `# >>> exercise 4: ODD` markers", "the classroom.md page"):
        with pytest.raises(MarkerError, match="docs/method.md:2: .* student copy"):
            check_shipped_doc("docs/method.md", "fine\n" + text)


def test_a_reference_in_a_test_file_becomes_a_skip(tmp_path):
    source = tmp_path / "test_m.py"
    source.write_text("import pytest\n\n\ndef slow():\n    # >>> exercise 3: a thing\n    return 1\n"
                      "    # <<< exercise 3\n")
    assert stub_file(str(source), {3}, is_test=True) == (
        "import pytest\n\n\ndef slow():\n    pytest.skip(\"the teacher's reference for exercise 3 (a thing) is "
        "not in the student copy, and this test needs it\")\n")
    source.write_text("def slow():\n    # >>> exercise 3: a thing\n    return 1\n    # <<< exercise 3\n")
    with pytest.raises(MarkerError, match="does not import pytest"):
        stub_file(str(source), {3}, is_test=True)
