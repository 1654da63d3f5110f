"""Command-line mistakes: argparse's (or psyface's) one-line error and exit 2, before any work, never a
traceback from deep inside (numpy's seed, range()'s step, socket.bind's port, iterdir() on a file)."""

from __future__ import annotations

import argparse

import pytest

from psyface.arguments import bounded, port_number, unit_interval
from psyface.cli import main

BAD_OPTIONS = [
    (["predict", "--batch-size", "0", "face.png"], "argument --batch-size: must be an integer >= 1, got 0"),
    (["synth", "--out", "OUT", "--seed", "-1"], "argument --seed: must be an integer >= 0, got -1"),
    (["synth", "--out", "OUT", "--pixel-noise", "-3"], "argument --pixel-noise: must be a number >= 0, got -3"),
    (["synth", "--out", "OUT", "--rater-noise", "inf"], "argument --rater-noise: must be a number >= 0, got inf"),
    (["synth", "--out", "OUT", "--raters", "1"], "argument --raters: must be an integer >= 2, got 1"),
    (["synth", "--out", "OUT", "--size", "16"], "argument --size: must be an integer >= 32, got 16"),
    (["synth-real", "--out", "OUT", "--n-identities", "0"], "argument --n-identities: must be an integer >= 1, got 0"),
    (["server", "start", "DIR", "--port", "70000"], "argument --port: must be an integer from 1 to 65535, got 70000"),
    (["server", "start", "DIR", "--workers", "0"], "argument --workers: must be an integer >= 1, got 0"),
    (["server", "start", "DIR", "--timeout", "0"], "argument --timeout: must be a number >= 1, got 0"),
    (["import", "generic", "--images", "DIR", "--id-column", "id", "--reliability-seed", "-1"],
     "argument --reliability-seed: must be an integer >= 0, got -1"),
    (["import", "us10k", "--reliability-splits", "0"], "argument --reliability-splits: must be an integer >= 1, got 0"),
    (["import", "us10k", "--workers", "0"], "argument --workers: must be an integer >= 1, got 0"),
    (["verdicts", "--target", "1.5"], "argument --target: must be a number from 0 to 1, got 1.5"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_OPTIONS,
                         ids=[f"{argv[0]} {message.split(':')[0].removeprefix('argument ')}" for argv, message in BAD_OPTIONS])
def test_an_option_out_of_range_is_one_error_line_and_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / word) if word in ("OUT", "DIR") else word for word in argv])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].endswith(f"error: {message}")
    assert "Traceback" not in err
    assert not (tmp_path / "OUT").exists()  # refused before anything was written


def test_bounded_parses_values_in_range_and_names_the_range():
    assert port_number("5000") == 5000 and unit_interval("0") == 0.0 and unit_interval("1") == 1.0
    assert bounded(float, 0.0)("2.5") == 2.5
    for parse, text in ((port_number, "0"), (port_number, "5000.5"), (unit_interval, "nan"), (unit_interval, "-0.1")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_server_init_on_a_file_is_one_error_line_and_leaves_it_alone(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(SystemExit) as stopped:
        main(["server", "init", str(notes)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"psyface: error: {notes} is a file, not a folder; choose a new folder"]
    assert notes.read_text() == "keep me"
