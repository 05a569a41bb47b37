"""Tests import the flat top-level modules (model.py, data.py, ...) from the repository root.

Classroom grading: a test marked `@pytest.mark.exercise(N)` grades exercise N (docs/classroom.md,
"Exercises"); `python -m pytest --exercise N` runs only those. With EM_NAT_GRADE_REPORT=path, the
outcome of every grading test is written there as JSON (the teacher's classroom test reads it); a
grading test that fails or is skipped has not passed: a skipped one graded nothing."""
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    parser.addoption("--exercise", type=int, action="append", metavar="N",
                     help="run only the tests that grade exercise N (repeatable)")


GRADES = {}          # nodeid -> {"exercises": [...], "passed": bool}, for EM_NAT_GRADE_REPORT


def pytest_configure(config):
    config.addinivalue_line("markers", "exercise(n, ...): this test grades exercise n "
                                       "(docs/classroom.md, Exercises)")


EXERCISE_MARK = re.compile(r"mark\.exercise\(([\d, ]+)\)")


def pytest_ignore_collect(collection_path, config):
    """With --exercise, a test file that grades none of the wanted exercises is not even imported:
    a grading then starts in a few seconds instead of collecting the whole suite."""
    wanted = config.getoption("--exercise")
    name = collection_path.name
    if not wanted or not (name.startswith("test_") and name.endswith(".py")):
        return None
    text = collection_path.read_text(encoding="utf-8")
    marked = {int(n) for args in EXERCISE_MARK.findall(text) for n in args.split(",") if n.strip()}
    return True if not marked & set(wanted) else None


def graded_exercises(item):
    return sorted({n for mark in item.iter_markers("exercise") for n in mark.args})


def pytest_collection_modifyitems(config, items):
    wanted = config.getoption("--exercise")
    if wanted:
        keep = [item for item in items if set(graded_exercises(item)) & set(wanted)]
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep
    for item in items:
        if graded_exercises(item):
            GRADES[item.nodeid] = {"exercises": graded_exercises(item), "passed": True}


def pytest_runtest_logreport(report):
    if report.nodeid in GRADES and (report.failed or report.skipped):
        GRADES[report.nodeid]["passed"] = False


def pytest_sessionfinish(session):
    path = os.environ.get("EM_NAT_GRADE_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(GRADES, f, indent=1)
