"""CLI basics: help, version, one-line errors and exit codes; `simulate` end to end."""
import csv

import h5py
import pytest

from lcls_dl import __version__
from lcls_dl.cli.main import COMMANDS, _available, main


def run_main(argv, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_help_lists_commands(capsys):
    code, out, _ = run_main(["--help"], capsys)
    assert code == 0
    assert "simulate" in out and "Commands" in out


def test_version(cli):
    proc = cli("--version", timeout=60)
    assert proc.returncode == 0
    assert __version__ in proc.stdout


@pytest.mark.parametrize("name", [n for n in COMMANDS if _available(n)])
def test_each_command_help_has_summary_and_example(name, capsys):
    code, out, err = run_main([name, "--help"], capsys)
    assert code == 0, err
    assert "Example" in out
    assert f"lcls-dl {name}" in out.split("Example", 1)[1]


def test_unknown_option_is_usage_error_on_one_line(cli):
    proc = cli("simulate", "out", "--frames", "2", "--no-such-option", timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lcls-dl: error:")
    assert "--no-such-option" in lines[0]


def test_unknown_command_is_usage_error(capsys):
    code, _, err = run_main(["no-such-command"], capsys)
    assert code == 2 and err.strip().startswith("lcls-dl: error:")


@pytest.mark.parametrize("args", [["--frames", "0"], ["--frames", "1", "--mix", "water=abc"],
                                  ["--frames", "1", "--ice-strength", "5"],
                                  ["--frames", "1", "--detector", "pilatus"], []])
def test_simulate_bad_values_exit_2(args, capsys, tmp_path):
    code, _, err = run_main(["simulate", str(tmp_path / "o"), *args], capsys)
    assert code == 2
    assert not (tmp_path / "o").exists()
    assert len(err.strip().splitlines()) == 1 and err.startswith("lcls-dl: error:")


def test_simulate_failure_is_one_line_exit_1(cli, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    proc = cli("simulate", "full", "--frames", "1", timeout=120)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines == ["lcls-dl: error: output directory is not empty (use --overwrite) (full)"]
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"


def test_simulate_bad_range_is_one_line_exit_1(capsys, tmp_path):
    code, _, err = run_main(["simulate", str(tmp_path / "o"), "--frames", "1",
                             "--hit-strength", "50,5"], capsys)
    assert code == 1
    assert err.count("\n") == 1 and "hit-strength" in err


def test_simulate_writes_cspad_run(cli, tmp_path):
    proc = cli("-q", "simulate", "run1", "--frames", "3", "--frames-per-file", "2",
               "--seed", "4", "--temperature", "221", "--hit-rate", "0.7",
               "--compression", "lzf", timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "run1"
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "run0001_000.cxi",
                                                     "run0001_001.cxi", "truth.csv"]
    with open(out / "truth.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["file"] for r in rows] == ["run0001_000.cxi"] * 2 + ["run0001_001.cxi"]
    assert {r["label"] for r in rows} <= {"water", "ice", "miss"}
    for r in rows:
        assert abs(float(r["temperature_k"]) - 221) < 3
    with h5py.File(out / "run0001_001.cxi", "r") as f:
        data = f["/entry_1/data_1/data"]
        assert data.shape == (1, 1480, 1552) and data.dtype == "int16"
