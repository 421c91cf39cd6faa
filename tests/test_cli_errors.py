"""Bad command lines end in argparse's one-line error (exit status 2), never a traceback, and
``fastopt bench`` refuses them before it times anything."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastopt
from fastopt import benchmark, cli, startup

BIG = "1" + "0" * 400  # a 400-digit number


@pytest.fixture(autouse=True)
def no_benchmark(monkeypatch):
    """Every bench here must stop at its checks: running the benchmark fails the test."""

    def ran(*args, **kwargs):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(benchmark, "run", ran)
    monkeypatch.setattr(startup, "measure", ran)
    # (the bench sets THP_MEM_ALLOC_ENABLE for torch in its process: not in the test run's)
    monkeypatch.setattr(benchmark, "torch_on_huge_pages", lambda: None)


def test_bench_says_which_state_formats_an_optimizer_has_not(monkeypatch):
    """--state-dtype int8 for Adafactor (float32 factors only) or ASGD (its state holds param
    values): said before the table, not dropped silently (found by a review)."""
    monkeypatch.undo()  # (the real benchmark.run, with tiny work)
    lines = []
    benchmark.run(["adafactor", "asgd"], [1000], 0.05, None, None, with_torch=False,
                  out=lines.append, progress=False, state_dtypes=("int8",))
    assert any(line.startswith("adafactor: no int8 state") for line in lines)
    assert any(line.startswith("asgd: no int8 state") for line in lines)


def usage_error(capsys, *argv: str) -> str:
    """Run ``fastopt argv...``; check it failed as argparse fails, having printed nothing on
    stdout; return the error line."""
    with pytest.raises(SystemExit) as info:
        cli.main(list(argv))
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(("fastopt schedule: error: ", "fastopt bench: error: ")), err
    return line


# ------------------------------------------------------------------ fastopt schedule


@pytest.mark.parametrize(("expression", "message"), [
    ("cosine(1e-3,", "'(' was never closed"),
    ("warmup(cosine(1e-3, 100) 10)", "not an expression"),
    ("cosine(1e-3, 100))", "unmatched ')'"),
    ("cosine(1e-3, 100) +", "not an expression"),
    ("a\x00b", "null bytes"),
    ("(" + "- " * 5000 + "1)", "not an expression"),  # nested past the parser's recursion limit
    ("[" * 300 + "]" * 300, "too many nested parentheses"),
    (f"cosine(1e-3, {BIG})", "total_steps must be <= 2**53"),
    (f"cosine({BIG}, 10)", "lr must be finite"),
    ("cosine(1e-3, 10, 1, 2, 3)", "positional arguments"),
    ("cosine(1e-3, 10, foo=1)", "unexpected keyword argument 'foo'"),
    ("cosin(1e-3, 100)", "not allowed"),
])
def test_schedule_expression_errors(capsys, expression, message):
    line = usage_error(capsys, "schedule", expression)
    assert message in line


@pytest.mark.parametrize(("options", "message"), [
    (["--every", "0"], "argument --every: must be >= 1"),
    (["--every", "-5"], "argument --every: must be >= 1"),
    (["--steps", "0"], "argument --steps: must be >= 1"),
    (["--steps", "abc"], "argument --steps: not a number"),
    (["--steps", "2.5"], "argument --steps: not a whole number"),
    (["--steps", "inf"], "argument --steps: not a whole number"),
    (["--steps", BIG], "argument --steps: must be <= 2**53"),
    (["--steps", "1e12", "--every", "1"], "rows"),
])
def test_schedule_option_errors(capsys, options, message):
    line = usage_error(capsys, "schedule", "cosine(1e-3, 100)", *options)
    assert message in line


def test_schedule_every_beyond_steps_and_float_notation(capsys):
    assert cli.main(["schedule", "cosine(1e-3, 100)", "--steps", "1e3", "--every", BIG]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [r.split()[0] for r in rows] == ["0"]


def test_schedule_plot_without_matplotlib(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails
    line = usage_error(capsys, "schedule", "cosine(1e-3, 100)", "--plot", str(tmp_path / "a.png"))
    assert "--plot needs matplotlib" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "message"), [
    ("missing/lr.png", "no such directory"),
    (".", "is a directory"),
    ("lr.xyz", "cannot write .xyz files"),
])
def test_schedule_plot_path_errors(capsys, tmp_path, name, message):
    pytest.importorskip("matplotlib")
    line = usage_error(capsys, "schedule", "cosine(1e-3, 100)", "--plot", str(tmp_path / name))
    assert message in line


def test_schedule_plot_of_many_steps_samples_them(tmp_path):
    """2**53 steps: the table has 9 rows and the plot samples the steps (no 2**53 array)."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "lr.png"
    assert cli.main(["schedule", "cosine(1e-3, 1e15)", "--steps", str(2**53), "--every",
                     str(2**50), "--plot", str(path)]) == 0
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_schedule_into_a_closed_pipe_is_quiet():
    """``fastopt schedule ... | head -1``: no BrokenPipeError traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastopt.cli", "schedule", "cosine(1e-3, 1000000)", "--steps",
         "1000000", "--every", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(Path(fastopt.__file__).resolve().parents[1])))
    assert proc.stdout.readline().startswith(b"cosine(")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert err == ""


# ------------------------------------------------------------------ fastopt bench


@pytest.mark.parametrize(("sizes", "message"), [
    ("-5", "must be >= 1, got '-5'"),
    ("0", "must be >= 1, got '0'"),
    ("1e4,0", "must be >= 1, got '0'"),
    ("abc", "not a number: 'abc'"),
    ("1e4;1e5", "not a number"),
    ("2.5", "not a whole number"),
    ("inf", "not a whole number"),
    ("nan", "not a whole number"),
])
def test_bench_bad_sizes(capsys, sizes, message):
    line = usage_error(capsys, "bench", "--sizes", sizes, "--no-torch")
    assert "argument --sizes: " + message in line


@pytest.mark.parametrize("sizes", [BIG, "1e15"])
def test_bench_sizes_beyond_memory(capsys, sizes):
    assert "need at least" in usage_error(capsys, "bench", "--sizes", sizes, "--no-torch")


@pytest.mark.parametrize("budget", ["0", "-1", "nan", "inf", "x"])
def test_bench_bad_budget(capsys, budget):
    assert "argument --budget: " in usage_error(capsys, "bench", "--budget", budget)


@pytest.mark.parametrize("option", ["--json", "--markdown", "--plot"])
def test_bench_output_in_a_missing_directory(capsys, tmp_path, option):
    if option == "--plot":
        pytest.importorskip("matplotlib")
    line = usage_error(capsys, "bench", "--sizes", "2000", "--no-torch", option,
                       str(tmp_path / "missing" / "out"))
    assert f"{option} " in line and "no such directory" in line


def test_bench_output_errors(capsys, tmp_path):
    assert "is a directory" in usage_error(capsys, "bench", "--json", str(tmp_path))
    assert "empty path" in usage_error(capsys, "bench", "--json", "")
    same = str(tmp_path / "r.json")
    assert "name the same file" in usage_error(capsys, "bench", "--no-torch", "--json", same,
                                               "--markdown", same)
    page = tmp_path / "page.md"
    page.write_bytes(b"\xff\xfe\x00 not text")
    assert "cannot read the existing page" in usage_error(capsys, "bench", "--markdown", str(page))
    assert page.read_bytes() == b"\xff\xfe\x00 not text"  # left as it was


def test_bench_plot_without_matplotlib(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    line = usage_error(capsys, "bench", "--sizes", "2000", "--plot", str(tmp_path / "b.png"))
    assert "--plot needs matplotlib" in line


def test_bench_without_torch(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    assert "--no-torch" in usage_error(capsys, "bench", "--sizes", "2000")


def test_bench_bad_models(capsys, tmp_path):
    assert "no shape list" in usage_error(capsys, "bench", "--models", "no_such_model")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    assert f"--models {bad_json}: " in usage_error(capsys, "bench", "--models", str(bad_json))
    for data in ([1, 2], {"model": "m"}, {"model": "m", "shapes": [{"shape": [3, -1]}]},
                 {"model": "m", "shapes": [{"shape": 7}]}, {"model": "m", "shapes": []}):
        path = tmp_path / "shapes.json"
        path.write_text(json.dumps(data))
        assert f"--models {path}: " in usage_error(capsys, "bench", "--models", str(path))


def test_bench_checks_pass_a_good_command_line(tmp_path, monkeypatch):
    """Valid options reach benchmark.run as parsed, and the checks leave no file behind."""
    calls = []
    monkeypatch.setattr(benchmark, "run", lambda *a, **k: calls.append((a, k)))
    argv = ["bench", "--optimizer", "AdamW", "--sizes", "1e4, 2000,", "--budget", "0.5",
            "--models", "resnet50", "--no-torch", "--json", str(tmp_path / "r.json"),
            "--markdown", str(tmp_path / "r.md")]
    assert cli.main(argv) == 0
    ((args, kwargs),) = calls
    assert args[:3] == (["adamw"], [10_000, 2000], 0.5)
    assert kwargs["models"] == ["resnet50"]
    assert kwargs["command"] == "fastopt " + " ".join(
        a if " " not in a else f"'{a}'" for a in argv)
    assert list(tmp_path.iterdir()) == []


def test_bench_threads(capsys, monkeypatch):
    """--threads sets Numba's thread count (torch follows it in benchmark.run), within the
    pool Numba started with."""
    import numba

    most = numba.config.NUMBA_NUM_THREADS
    assert f"--threads {most + 1}: at most {most}" in usage_error(
        capsys, "bench", "--threads", str(most + 1))
    assert "must be >= 1" in usage_error(capsys, "bench", "--threads", "0")
    seen = []
    monkeypatch.setattr(benchmark, "run", lambda *a, **k: seen.append(numba.get_num_threads()))
    before = numba.get_num_threads()
    try:
        assert cli.main(["bench", "--threads", "1", "--sizes", "1e4", "--no-torch"]) == 0
    finally:
        numba.set_num_threads(before)
    assert seen == [1]


def test_bench_interrupted(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(benchmark, "run", interrupted)
    assert cli.main(["bench", "--sizes", "2000", "--no-torch"]) == 130
    assert capsys.readouterr().err == "fastopt: interrupted\n"
