"""The command line as a user meets it, on real processes: Ctrl-C, a diverging loss and bad input
end in one line on stderr (never a traceback), and the same command resumes; and the layout that
makes it so (imports in one direction, so `python train.py` runs one copy of each module)."""
import ast
import os
import signal
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("options.py", "model.py", "data.py", "decode.py", "train.py", "report.py", "em_nat.py")
SMALL = ["--toy-train-size", "200", "--nar-steps", "5", "--warmup", "10", "--em-iterations", "0",
         "--max-tokens", "512", "--speed-sentences", "2", "--examples", "0", "--device", "cpu",
         "--threads", "1"]


def train_py(args, **kwargs):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          **kwargs)


def wait_for(process, text, timeout=120):
    """Read the process's stderr until `text` appears (tqdm writes its progress there)."""
    seen, deadline = "", time.time() + timeout
    while text not in seen:
        char = process.stderr.read(1)
        if not char or time.time() > deadline:
            raise AssertionError(f"never saw {text!r}; stderr: {seen[-2000:]}")
        seen += char
    return seen


def test_ctrl_c_stops_with_one_line_and_the_same_command_resumes(tmp_path):
    args = SMALL + ["--ar-steps", "300", "--valid-every", "100", "--out", str(tmp_path / "run")]
    process = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    # the AR model's loop has started (its progress bar's first line; redirected, the bar writes a
    # line a minute, and Ctrl-C stops after the step under way)
    wait_for(process, "ar:")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("stopped at step ") and last.endswith(" of ar; run the same command "
                                                                 "again to resume")
    stopped_at = int(last.split()[3])
    assert 0 < stopped_at < 300
    resumed = train_py(args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"ar: resuming at step {stopped_at} of 300" in resumed.stdout
    assert "nar-kd" in resumed.stdout and "saved " in resumed.stdout
    # Redirected to a file or pipe, progress bars write whole lines, never carriage-return frames.
    assert "\r" not in resumed.stderr and "\r" not in resumed.stdout


def test_a_diverging_loss_ends_with_one_line(tmp_path):
    result = train_py(SMALL + ["--ar-steps", "50", "--valid-every", "10", "--lr", "1e30", "--out",
                               str(tmp_path)])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ar: the loss became") and "lower --lr (now 1e+30)" in last


def test_bad_counts_are_refused_when_the_options_are_read(tmp_path):
    for option, value, message in (("--ar-steps", "-5", "ar_steps must be positive, not -5"),
                                   ("--candidates", "0", "--candidates must be at least 1"),
                                   ("--em-iterations", "-1", "--em-iterations must be 0 or more")):
        result = train_py(SMALL + [option, value, "--out", str(tmp_path / option)])
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert message in result.stderr.strip().splitlines()[-1]
        assert not os.path.exists(tmp_path / option / "ar")               # nothing was trained


def last_line(result):
    return result.stderr.strip().splitlines()[-1]


def test_a_device_this_machine_lacks_is_refused_in_one_line(tmp_path):
    absent = [d for d, present in (("cuda", torch.cuda.is_available()),
                                   ("mps", torch.backends.mps.is_available()), ("gpu", False))
              if not present]
    for device in absent:
        for script in ("train.py", "decode.py"):
            out = ["--out", str(tmp_path)] if script == "train.py" else []
            result = subprocess.run([sys.executable, script, "--device", device, *out], cwd=ROOT,
                                    capture_output=True, text=True, timeout=120)
            assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
            expected = f"error: --device {device}: not on this machine; available: cpu"
            assert expected in last_line(result)


def test_an_unknown_benchmark_preset_names_the_presets():
    result = subprocess.run([sys.executable, "decode.py", "--benchmark", "--preset", "nope"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "argument --preset: invalid choice: 'nope'" in last_line(result)
    assert all(f"'{name}'" in last_line(result) for name in ("toy", "small", "iwslt", "base"))


def test_python_train_py_loads_each_module_once():
    # Run as a script, train.py is the module __main__; em_nat's `import train` must find that copy,
    # not load the file again (two TrainConfig classes; an `except Stopped` that misses the
    # other's).
    result = subprocess.run([sys.executable, "-X", "importtime", "train.py", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")]
    project = [name for name in imported if f"{name}.py" in MODULES]
    assert "train" not in project and len(project) == len(set(project)), project


def write_corpus(directory, splits=("train", "valid", "test"),
                 train_lines=("a b c", "b c a", "c a b")):
    directory.mkdir(exist_ok=True)
    for split in splits:
        lines = train_lines if split == "train" else ("a b", "c")
        (directory / f"{split}.de").write_text("".join(line + "\n" for line in lines))
        (directory / f"{split}.en").write_text("".join(line.upper() + "\n" for line in lines))


def test_an_empty_corpus_and_a_missing_test_split_say_so(tmp_path):
    write_corpus(tmp_path / "empty", train_lines=())
    result = train_py(SMALL + ["--data-dir", str(tmp_path / "empty"), "--bpe-merges", "0",
                               "--ar-steps", "5", "--valid-every", "5", "--out",
                               str(tmp_path / "run1")])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "no training pairs left" in result.stderr.strip().splitlines()[-1]
    write_corpus(tmp_path / "no-test", splits=("train", "valid"))
    result = train_py(SMALL + ["--data-dir", str(tmp_path / "no-test"), "--bpe-merges", "0",
                               "--ar-steps", "5", "--valid-every", "5", "--out",
                               str(tmp_path / "run2")])
    # (a 5-step AR model may translate everything as empty, which stops the run at nar-kd: not the
    # point)
    assert ("no test split (test.de/test.en): every stage is evaluated on the validation split"
            in result.stdout)
    assert '"split": "valid"' in (tmp_path / "run2" / "ar" / "result.json").read_text()


def test_decode_reports_unknown_words_by_line(tmp_path):
    write_corpus(tmp_path / "data")
    run = tmp_path / "run"
    result = train_py(SMALL + ["--data-dir", str(tmp_path / "data"), "--bpe-merges", "0",
                               "--ar-steps", "5", "--valid-every", "5", "--out", str(run)])
    assert (run / "ar" / "result.json").is_file(), result.stderr
    (tmp_path / "in.txt").write_text("a b\nzz a qq\n\n")
    out = subprocess.run([sys.executable, "decode.py", "--checkpoint", str(run / "ar"), "--input",
                          str(tmp_path / "in.txt")], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines() == [f"decode.py: {tmp_path / 'in.txt'}:2: 2 unknown "
                                               f"word(s) become "
                                               f"<unk>: qq zz"]
    assert len(out.stdout.split("\n")) == 4                          # one line per input line


# ----- the layout ---------------------------------------------------------------------------------
def module_imports():
    """{module: the project modules it imports}, and every import found inside a function."""
    graph, inner = {}, []
    for name in MODULES:
        tree = ast.parse(open(os.path.join(ROOT, name)).read())
        local = {m[:-3] for m in MODULES}
        graph[name[:-3]] = set()
        for node in tree.body:
            if isinstance(node, ast.Import):
                graph[name[:-3]] |= {a.name for a in node.names} & local
            elif isinstance(node, ast.ImportFrom):
                graph[name[:-3]] |= {node.module} & local
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner += [f"{name}:{node.name}" for sub in ast.walk(node)
                          if isinstance(sub, (ast.Import, ast.ImportFrom))]
    return graph, inner


def test_imports_go_one_way_and_never_inside_a_function():
    graph, inner = module_imports()
    assert not inner, inner
    # each imports only modules before it
    order = ["options", "model", "data", "train", "decode", "report", "em_nat"]
    for i, name in enumerate(order):
        assert graph[name] <= set(order[:i]), (name, graph[name])


def code_lines(function):
    """A function's length in lines, its docstring not counted: an exercise's docstring states
    everything its grading checks, and may be long."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        docstring = body[0].end_lineno - body[0].lineno + 1
    else:
        docstring = 0
    return function.end_lineno - function.lineno + 1 - docstring


def test_functions_are_short_outside_argument_parsers():
    long = []
    for name in MODULES:
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, name)).read())):
            if isinstance(node, ast.FunctionDef) and code_lines(node) > 50:
                if node.name not in ("build_parser",) and not node.name.startswith("add_"):
                    long.append(f"{name}:{node.name} ({code_lines(node)} lines)")
    assert not long, long


def test_help_of_each_command_prints():
    for script in ("train.py", "decode.py"):
        out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and "usage:" in out.stdout and not out.stderr, out.stderr
