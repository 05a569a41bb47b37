"""The classroom exercises grade what they claim to: for every exercise, in a student copy where only
that exercise is cut out (tests/student_copy.py), its grading tests fail and every other exercise's
grading tests pass; in the reference project they all pass. An exercise whose grading tests passed on
the stub would grade nothing; one whose stub broke another exercise's tests would grade unfairly."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from student_copy import MarkerError, ROOT, list_exercises, stub_file, write_student_copy


def grade(project_dir, report):
    """Run every grading test of `project_dir` in a fresh interpreter; {nodeid: {exercises, passed}}."""
    env = dict(os.environ, EM_NAT_GRADE_REPORT=str(report), OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    subprocess.run(args + [f"--exercise={n}" for n in list_exercises(ROOT)], cwd=project_dir, env=env,
                   capture_output=True, timeout=600)
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
