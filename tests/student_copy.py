"""A student's copy of em-nat, for classroom assignments: the project with the solution of chosen
exercises cut out, and nothing of them left elsewhere.

    python tests/student_copy.py ../em-nat-student              # every exercise
    python tests/student_copy.py ../em-nat-student -e 4 6       # only ODD Viterbi and beam search
    python tests/student_copy.py ../em-nat-student --with-expected-figures
                                                                # docs/results.md ships too
    python tests/student_copy.py --list                         # the exercises and where they are

The solutions are marked in the source by comment lines

    # >>> exercise 4: ODD Viterbi
    ... the reference solution ...
    # <<< exercise 4

and an exercise may have several such regions (in one file or several). In the copy, every region of
a chosen exercise becomes one line that raises NotImplementedError naming the exercise (a region of
whole functions at module level keeps each function's signature and docstring, its body that line);
the rest of the project is copied as it is, so it imports and runs, and
`python -m pytest --exercise 4` grades the student's work. The same markers in tests/*.py wrap the
tests' own slow reference implementations of an exercise (tests/test_decode.py's plain_beam_search):
in the copy such a region becomes a pytest.skip line, so the reference is not handed out and the
tests that need it skip, saying why. Grading tests (@pytest.mark.exercise) must not need such a
reference.

Teacher tools (this file, tests/test_classroom.py, tests/test_docs.py), the project's README,
docs/classroom.md (how copies are made, tolerances) and docs/reproducing.md stay out of the copy.
The copy's README.md is written from docs/classroom_student.md: the copy's exercises and where their
stubs are, how to grade them, the reading-order and exercise tables of docs/classroom.md and the map
from the paper to the code of docs/method.md. docs/method.md ships as it is, after a check that it
holds no expected figure and names no file the copy lacks (SHIPPED_DOCS, TEACHER_ONLY);
--with-expected-figures adds docs/results.md (the expected figures) with a note on top.
tests/test_classroom.py proves that each exercise's grading tests fail on its stub, and only there,
that grading passes exactly for the solved exercises as a student solves them one by one, that
plausible wrong solutions fail their exercise's grading, and that right solutions written otherwise
than the reference pass it.
"""
import argparse
import ast
import os
import re
import shutil
import sys
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = tuple(name for name in ("options.py", "model.py", "data.py", "decode.py", "em_nat.py",
                                  "train.py", "report.py")
                if os.path.isfile(os.path.join(ROOT, name)))
# Copied as they are (the modules: stubbed); the licence asks to be kept with every copy.
PROJECT_FILES = ("LICENSE", "requirements.txt", "pytest.ini")
# In tests/, never in a copy: the teacher's tools, and test_docs.py, which checks the project's
# README and docs/ pages (a copy holds its own README and docs/method.md only).
TEACHER_FILES = ("student_copy.py", "test_classroom.py", "test_docs.py")
STUDENT_README = os.path.join("docs", "classroom_student.md")
CLASSROOM = os.path.join("docs", "classroom.md")          # the reading order and exercise tables
METHOD = os.path.join("docs", "method.md")                # the map from the paper to the code
SHIPPED_DOCS = (METHOD,)                                  # copied as they are, once checked
FIGURES = os.path.join("docs", "results.md")              # ships only with --with-expected-figures
# What a shipped document must not hold: names of teacher tools or of pages the copy lacks, the
# solution markers, or expected figures ("88.3 [83.7, 93.7]").
TEACHER_ONLY = re.compile(r"student_copy|test_classroom|# >>> exercise|classroom\.md|results\.md|"
                          r"reproducing\.md|README|Expected[ (:]|\d\.\d \[\d")
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
                raise MarkerError(f"{path}:{i + 1}: exercise {start[2]} starts inside exercise "
                                  f"{open_region[0]}")
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


def stub_file(path, chosen, is_test=False):
    """The text of `path` with every region of the `chosen` exercises replaced by a raise (a module)
    or by a pytest.skip (is_test: a test file's reference implementation of the exercise)."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, title, indent, first, last in reversed(exercise_regions(path)):
        if number in chosen:
            if is_test:
                reason = (f"the teacher's reference for exercise {number} ({title}) is not in the "
                          f"student copy, and this test needs it")
                lines[first:last + 1] = [f"{indent}pytest.skip({reason!r})"]
            else:
                message = (f"exercise {number} ({title}): write this part; README 'Exercises' says "
                           f"what, and `python -m pytest --exercise {number}` grades it")
                raise_line = f"raise NotImplementedError({message!r})"
                if indent:                                    # a part of a function body
                    lines[first:last + 1] = [f"{indent}{raise_line}"]
                else:                                         # whole functions: their heads stay
                    lines[first:last + 1] = stub_functions(lines[first + 1:last], raise_line,
                                                           f"{path}:{first + 1}")
    text = "\n".join(lines)
    if is_test and "pytest.skip(" in text and not re.search(r"^import pytest$", text, re.M):
        raise MarkerError(f"{path}: a stubbed reference becomes pytest.skip, but the file does not "
                          f"import pytest")
    return text


def stub_functions(lines, raise_line, where):
    """A module-level region of whole functions -> each function's decorators, signature and
    docstring, with a body that is `raise_line`: the copy still imports, and the docstrings (the
    task) ship."""
    tree = ast.parse("\n".join(lines))
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            raise MarkerError(f"{where}: a module-level exercise region may hold only functions, "
                              f"not {type(node).__name__} (line {node.lineno} of the region)")
        first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
        body = node.body[0]
        has_doc = (isinstance(body, ast.Expr) and isinstance(body.value, ast.Constant)
                   and isinstance(body.value.value, str))
        head_end = body.end_lineno if has_doc else body.lineno - 1
        body_indent = lines[body.lineno - 1][:len(lines[body.lineno - 1])
                                             - len(lines[body.lineno - 1].lstrip())]
        out += ([""] * 2 if out else []) + lines[first:head_end] + [body_indent + raise_line]
    return out


def shipped_test_files(root=ROOT):
    """The test files that ship in a copy (tests/, without the teacher's tools)."""
    return sorted(name for name in os.listdir(os.path.join(root, "tests"))
                  if name.endswith(".py") and name not in TEACHER_FILES)


def markdown_table(text, heading, source="README.md"):
    """The first markdown table after the line `heading` of a markdown page (`source`, named in
    errors), as a list of lines."""
    lines = text.split("\n")
    if heading not in lines:
        raise MarkerError(f"{source} has no heading {heading!r}, whose table the student's "
                          f"README shows")
    start = lines.index(heading) + 1
    while start < len(lines) and not lines[start].startswith("|"):
        start += 1
    end = start
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    if end - start < 3:
        raise MarkerError(f"{source}: no table under {heading!r}")
    return lines[start:end]


def stub_places(dest):
    """{exercise: ["file:line (in function)", ...]} of the stub lines written in the copy at
    `dest`."""
    places = defaultdict(list)
    stub = re.compile(r"^\s*raise NotImplementedError\(['\"]exercise (\d+) \(")
    for name in MODULES:
        function = "?"
        with open(os.path.join(dest, name), encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                d = re.match(r"^\s*def (\w+)", line)
                function = d[1] if d else function
                if stub.match(line):
                    places[int(stub.match(line)[1])].append(f"`{name}` line {i} (in `{function}`)")
    return places


def read_doc(root, name):
    with open(os.path.join(root, name), encoding="utf-8") as f:
        return f.read()


def student_readme(dest, chosen, available, with_expected_figures, root=ROOT):
    """The copy's README.md: docs/classroom_student.md with this copy's exercises, the reading-order
    and exercise tables of docs/classroom.md, and the map of docs/method.md."""
    classroom, method = read_doc(root, CLASSROOM), read_doc(root, METHOD)
    template = read_doc(root, STUDENT_README)
    template = template[template.index("-->") + 3:].lstrip("\n")     # the note to the teacher
    places = stub_places(dest)
    exercises = "\n".join(f"- **Exercise {n}: {available[n][0]}**: {', '.join(places[n])}"
                          for n in sorted(chosen))
    table = markdown_table(classroom, "## Exercises", CLASSROOM)
    rows = [row for row in table[2:] if int(row.split("|")[1]) in chosen]
    if len(rows) != len(chosen):
        raise MarkerError(f"{CLASSROOM}'s exercise table has rows for {len(rows)} of the exercises "
                          f"{sorted(chosen)}")
    figures = ("The expected figures, measured on the reference implementation, are in "
               "docs/results.md." if with_expected_figures else
               "This copy gives no expected figures: what you measure is the result, and your "
               "seeds' spread tells you how far to trust a difference.")
    return template.format(exercises=exercises, exercise_table="\n".join(table[:2] + rows),
                           reading_order="\n".join(markdown_table(classroom, "## Reading order",
                                                                  CLASSROOM)),
                           paper_map="\n".join(markdown_table(method,
                                                              "## Map from the paper to the code",
                                                              METHOD)),
                           expected_figures=figures)


def check_shipped_doc(name, text):
    """A document that ships as it is must be true in the copy: no expected figure, no solution
    marker, no name of a teacher tool or of a page the copy lacks."""
    for number, line in enumerate(text.split("\n"), 1):
        found = TEACHER_ONLY.search(line)
        if found:
            raise MarkerError(f"{name}:{number}: {found[0]!r} would be untrue or an answer in a "
                              f"student copy; keep expected figures in {FIGURES} and teacher "
                              f"matters in {CLASSROOM}")


FIGURES_NOTE = ("> The expected figures of the experiments, measured on the reference "
                "implementation and shipped\n"
                "> with this copy. Links to other pages of the reference project (its README, "
                "docs/classroom.md,\n"
                "> docs/reproducing.md) lead to files this copy does not hold; README.md says what "
                "to do here.\n\n")


def write_student_copy(dest, exercises=None, root=ROOT, with_expected_figures=False):
    """Copy the project to `dest` with the solutions of `exercises` (default: all) cut out."""
    available = list_exercises(root)
    chosen = set(available) if not exercises else set(exercises)
    unknown = sorted(chosen - set(available))
    if unknown:
        raise MarkerError(f"no exercise {', '.join(map(str, unknown))}; the exercises are "
                          f"{sorted(available)}")
    docs = {name: read_doc(root, name) for name in SHIPPED_DOCS}
    for name, text in docs.items():
        check_shipped_doc(name, text)
    if os.path.exists(dest) and os.listdir(dest):
        raise FileExistsError(f"{dest} exists and is not empty; choose a new directory")
    os.makedirs(os.path.join(dest, "tests"), exist_ok=True)
    os.makedirs(os.path.join(dest, "docs"), exist_ok=True)
    for name in PROJECT_FILES:
        if os.path.isfile(os.path.join(root, name)):
            shutil.copy2(os.path.join(root, name), os.path.join(dest, name))
    for name in MODULES:
        with open(os.path.join(dest, name), "w", encoding="utf-8") as f:
            f.write(stub_file(os.path.join(root, name), chosen))
    for name in shipped_test_files(root):
        with open(os.path.join(dest, "tests", name), "w", encoding="utf-8") as f:
            f.write(stub_file(os.path.join(root, "tests", name), chosen, is_test=True))
    if with_expected_figures:
        docs[FIGURES] = FIGURES_NOTE + read_doc(root, FIGURES)
    for name, text in docs.items():
        with open(os.path.join(dest, name), "w", encoding="utf-8") as f:
            f.write(text)
    with open(os.path.join(dest, "README.md"), "w", encoding="utf-8") as f:
        f.write(student_readme(dest, chosen, available, with_expected_figures, root))
    return sorted(chosen)


def build_parser():
    p = argparse.ArgumentParser(description="Write a student's copy of em-nat "
                                            "with exercises cut out.")
    p.add_argument("dest", nargs="?", help="directory of the copy (new or empty)")
    p.add_argument("-e", "--exercises", type=int, nargs="+", metavar="N",
                   help="the exercises to cut out (default: all)")
    p.add_argument("--with-expected-figures", action="store_true",
                   help="also ship docs/results.md (the expected figures of the experiments)")
    p.add_argument("--list", action="store_true",
                   help="list the exercises and where they are, then exit")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.list or not args.dest:
        for number, (title, places) in list_exercises().items():
            print(f"exercise {number}: {title:<42} {', '.join(places)}")
        return
    try:
        chosen = write_student_copy(args.dest, args.exercises,
                                    with_expected_figures=args.with_expected_figures)
    except (MarkerError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {args.dest} with exercises {', '.join(map(str, chosen))} to write; "
          f"grade one with `python -m pytest --exercise N` there (its README.md says so)")


if __name__ == "__main__":
    main()
