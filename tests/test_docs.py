"""Docs that cannot rot silently: the README's Python snippet and shell commands run against a real
(tiny) run, and every command-line option the docs mention exists in the --help of its command."""
import glob
import os
import re
import subprocess
import sys

import pytest

import decode
import em_nat
from student_copy import build_parser as student_copy_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
# Options of the other tools the docs show: pip, pytest, torchrun, sacrebleu, git.
OTHER_TOOLS = {"--exercise", "--collect-only", "--durations", "--nproc_per_node", "--nnodes",
               "--node_rank", "--master_addr", "--master_port", "--standalone", "--tokenize",
               "--input", "--help", "--version", "--force", "--metrics", "--lowercase", "--width",
               "--upgrade", "--quiet", "--verbose"}
TINY = ["--toy-train-size", "300", "--ar-steps", "60", "--nar-steps", "40", "--valid-every", "20",
        "--warmup", "20", "--max-tokens", "512", "--candidates", "4", "--speed-sentences", "2",
        "--examples", "0", "--threads", "1", "--device", "cpu"]


def parser_options(parser):
    return {option for action in parser._actions for option in action.option_strings}


def test_every_option_the_docs_mention_exists():
    # A line that runs a command is checked against that command's options; prose against them all.
    commands = {"decode.py": parser_options(decode.build_parser()),
                "train.py": parser_options(em_nat.build_parser()),
                "student_copy.py": parser_options(student_copy_parser())}
    everything = set().union(*commands.values()) | OTHER_TOOLS
    unknown = []
    for path in DOCS:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                code = line.split("#")[0] if line.lstrip().startswith(
                    ("python", "torchrun")) else line
                runs = [name for name in commands if name in code]
                known = commands[runs[0]] | OTHER_TOOLS if len(runs) == 1 else everything
                for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*[a-z0-9])", code):
                    if option not in known:
                        unknown.append(f"{os.path.relpath(path, ROOT)}:{number}: {option}")
    assert not unknown, unknown


def code_blocks(language):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return re.findall(rf"```{language}\n(.*?)```", f.read(), flags=re.S)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny run of the whole pipeline where the README's commands look for it: runs/toy-toy."""
    cwd = tmp_path_factory.mktemp("readme")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY], cwd=cwd,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert os.path.isfile(cwd / "runs" / "toy-toy" / "em2-nar" / "model.pt")
    return cwd


def test_the_readme_python_snippet_runs(tiny_run):
    (snippet,) = code_blocks("python")
    out = subprocess.run([sys.executable, "-c", snippet], cwd=tiny_run, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    printed = eval(out.stdout.strip())                             # a list of two translations
    assert isinstance(printed,
                      list) and len(printed) == 2 and all(isinstance(t, str) and t for t in printed)


def test_the_readme_translation_commands_run(tiny_run):
    commands = [line.split("#")[0].strip() for block in code_blocks("bash")
                for line in block.splitlines()
                if "decode.py --checkpoint" in line]
    assert len(commands) == 2
    for command in commands:
        command = command.replace("python decode.py",
                                  f"{sys.executable} {os.path.join(ROOT, 'decode.py')}")
        out = subprocess.run(command, shell=True, cwd=tiny_run, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0 and len(
            out.stdout.splitlines()) == 1 and out.stdout.strip(), out.stderr
