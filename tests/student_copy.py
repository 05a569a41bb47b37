"""A student's copy of em-nat, for classroom assignments: the project with the solution of chosen
exercises cut out.

    python tests/student_copy.py ../em-nat-student              # every exercise
    python tests/student_copy.py ../em-nat-student -e 4 6       # only ODD Viterbi and beam search
    python tests/student_copy.py --list                         # the exercises and where they are

The solutions are marked in the source by comment lines

    # >>> exercise 4: ODD Viterbi
    ... the reference solution ...
    # <<< exercise 4

and an exercise may have several such regions (in one file or several). In the copy, every region of a
chosen exercise becomes one line that raises NotImplementedError naming the exercise; the rest of the
project is copied as it is, so it imports and runs, and `python -m pytest --exercise 4` grades the
student's work (README, "Exercises"). tests/test_classroom.py proves that each exercise's grading
tests fail on its stub, and only there.
"""
import argparse
import os
import re
import shutil
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("model.py", "data.py", "decode.py", "em_nat.py", "train.py")
PROJECT_FILES = ("README.md", "requirements.txt", "pytest.ini") + MODULES
START = re.compile(r"^(\s*)# >>> exercise (\d+): (.+?)\s*$")
END = re.compile(r"^\s*# <<< exercise (\d+)\s*$")


class MarkerError(ValueError):
    """The exercise markers of a source file do not pair up."""


def exercise_regions(path):
    """The marked regions of one source file: a list of (exercise, title, indent, first line, last
    line), 0-based lines of the two marker comments, in file order."""
    regions, open_region = [], None
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for i, line in enumerate(lines):
        start, end = START.match(line), END.match(line)
        if start:
            if open_region:
                raise MarkerError(f"{path}:{i + 1}: exercise {start[2]} starts inside exercise {open_region[0]}")
            open_region = (int(start[2]), start[3], start[1], i)
        elif end:
            if not open_region or int(end[1]) != open_region[0]:
                raise MarkerError(f"{path}:{i + 1}: end of exercise {end[1]} without its start")
            regions.append((*open_region, i))
            open_region = None
    if open_region:
        raise MarkerError(f"{path}:{open_region[3] + 1}: exercise {open_region[0]} is never closed")
    return regions


def list_exercises(root=ROOT):
    """{exercise: (title, ["file:line", ...])} over the project's modules."""
    found = defaultdict(lambda: ["", []])
    for name in MODULES:
        for number, title, _, first, _ in exercise_regions(os.path.join(root, name)):
            found[number][0] = found[number][0] or title
            found[number][1].append(f"{name}:{first + 1}")
    return {n: tuple(found[n]) for n in sorted(found)}


def stub_file(path, chosen):
    """The text of `path` with every region of the `chosen` exercises replaced by a raise."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, title, indent, first, last in reversed(exercise_regions(path)):
        if number in chosen:
            message = (f"exercise {number} ({title}): write this part; README 'Exercises' says what, "
                       f"and `python -m pytest --exercise {number}` grades it")
            lines[first:last + 1] = [f"{indent}raise NotImplementedError({message!r})"]
    return "\n".join(lines)


def write_student_copy(dest, exercises=None, root=ROOT):
    """Copy the project to `dest` with the solutions of `exercises` (default: all) cut out."""
    available = list_exercises(root)
    chosen = set(available) if not exercises else set(exercises)
    unknown = sorted(chosen - set(available))
    if unknown:
        raise MarkerError(f"no exercise {', '.join(map(str, unknown))}; the exercises are {sorted(available)}")
    if os.path.exists(dest) and os.listdir(dest):
        raise FileExistsError(f"{dest} exists and is not empty; choose a new directory")
    os.makedirs(dest, exist_ok=True)
    for name in PROJECT_FILES:
        if os.path.isfile(os.path.join(root, name)):
            shutil.copy2(os.path.join(root, name), os.path.join(dest, name))
    shutil.copytree(os.path.join(root, "tests"), os.path.join(dest, "tests"),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in MODULES:
        with open(os.path.join(dest, name), "w", encoding="utf-8") as f:
            f.write(stub_file(os.path.join(root, name), chosen))
    return sorted(chosen)


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a student's copy of em-nat with exercises cut out.")
    p.add_argument("dest", nargs="?", help="directory of the copy (new or empty)")
    p.add_argument("-e", "--exercises", type=int, nargs="+", metavar="N",
                   help="the exercises to cut out (default: all)")
    p.add_argument("--list", action="store_true", help="list the exercises and where they are, then exit")
    args = p.parse_args(argv)
    if args.list or not args.dest:
        for number, (title, places) in list_exercises().items():
            print(f"exercise {number}: {title:<42} {', '.join(places)}")
        return
    try:
        chosen = write_student_copy(args.dest, args.exercises)
    except (MarkerError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.dest} with exercises {', '.join(map(str, chosen))} to write; "
          f"grade one with `python -m pytest --exercise N` there")


if __name__ == "__main__":
    main()
