"""Command-line mistakes: argparse's (or psyface's) one-line error and exit 2, before any work, never a
traceback from deep inside (numpy's seed, range()'s step, socket.bind's port, iterdir() on a file)."""

from __future__ import annotations

import argparse

import pytest
from PIL import Image

from psyface.arguments import non_negative_float, port_number, unit_interval
from psyface.cli import main
from psyface.errors import PsyfaceError
from psyface.io import replace_dir_atomic, write_atomic

BAD_OPTIONS = [
    (["predict", "--batch-size", "0", "face.png"], "argument --batch-size: 0 is out of range (must be >= 1)"),
    (["synth", "--out", "OUT", "--seed", "-1"], "argument --seed: -1 is out of range (must be >= 0)"),
    (["synth", "--out", "OUT", "--pixel-noise", "-3"], "argument --pixel-noise: -3.0 is out of range (must be >= 0)"),
    (["synth", "--out", "OUT", "--rater-noise", "inf"], "argument --rater-noise: inf is out of range (must be >= 0)"),
    (["synth", "--out", "OUT", "--raters", "1"], "argument --raters: 1 is out of range (must be >= 2)"),
    (["synth", "--out", "OUT", "--size", "16"], "argument --size: 16 is out of range (must be >= 32)"),
    (["synth-real", "--out", "OUT", "--n-identities", "0"], "argument --n-identities: 0 is out of range (must be >= 1)"),
    (["server", "start", "DIR", "--port", "70000"], "argument --port: 70000 is out of range (must be >= 1 and <= 65535)"),
    (["server", "start", "DIR", "--workers", "0"], "argument --workers: 0 is out of range (must be >= 1)"),
    (["server", "start", "DIR", "--timeout", "0"], "argument --timeout: 0.0 is out of range (must be > 0)"),
    (["import", "generic", "--images", "DIR", "--id-column", "id", "--reliability-seed", "-1"],
     "argument --reliability-seed: -1 is out of range (must be >= 0)"),
    (["import", "us10k", "--reliability-splits", "0"], "argument --reliability-splits: 0 is out of range (must be >= 1)"),
    (["import", "us10k", "--workers", "0"], "argument --workers: 0 is out of range (must be >= 1)"),
    (["verdicts", "--target", "1.5"], "argument --target: 1.5 is out of range (must be >= 0 and <= 1)"),
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


def test_the_argument_types_take_values_in_range_and_refuse_the_rest():
    assert port_number("5000") == 5000 and unit_interval("0") == 0.0 and unit_interval("1") == 1.0
    assert non_negative_float("2.5") == 2.5
    for parse, text in ((port_number, "0"), (port_number, "5000.5"), (unit_interval, "nan"), (unit_interval, "-0.1")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


# --out naming a folder where a file is written, or a file where a folder is: one line before any work
# (no model is loaded: these projects have none), the file left as it was.
WRONG_OUTPUTS = [
    (["predict", "--out", "FOLDER", "FACE"], "FOLDER is a folder; name a file to write"),
    (["explain", "--model", "models:/none@champion", "--out", "FILE", "FACE"], "FILE is a file, not a folder; name a folder to write"),
    (["synth", "--out", "FILE"], "FILE is a file, not a folder; name a folder to write"),
    (["synth-real", "--out", "FILE"], "FILE is a file, not a folder; name a folder to write"),
    (["synth", "--out", "FILE/data"], "cannot make the folder FILE: part of that path is a file"),
    (["server", "init", "FILE"], "FILE is a file, not a folder; name a folder to write"),
]


@pytest.mark.parametrize(("argv", "message"), WRONG_OUTPUTS, ids=[" ".join(argv[:1] + argv[-2:]) for argv, _ in WRONG_OUTPUTS])
def test_an_output_of_the_wrong_kind_is_one_error_line_and_leaves_the_file_alone(argv, message, tmp_path, capsys):
    names = {"FOLDER": tmp_path / "folder", "FILE": tmp_path / "notes.txt", "FACE": tmp_path / "face.png"}
    names["FOLDER"].mkdir()
    names["FILE"].write_text("keep me")
    Image.new("RGB", (64, 64), (128, 100, 90)).save(names["FACE"])

    def named(text: str) -> str:
        for key, path in names.items():
            text = text.replace(key, str(path))
        return text

    with pytest.raises(SystemExit) as stopped:
        main([named(word) for word in argv])
    assert stopped.value.code == 2
    expected = named(message)
    assert capsys.readouterr().err.splitlines() == [f"psyface: error: {expected}"]
    assert names["FILE"].read_text() == "keep me"


def test_the_atomic_writers_refuse_an_output_of_the_wrong_kind(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    with pytest.raises(PsyfaceError, match="is a folder; name a file to write"):
        write_atomic(tmp_path, lambda tmp: tmp.write_text("x"))
    with pytest.raises(PsyfaceError, match="is a file, not a folder"):
        replace_dir_atomic(notes, lambda tmp: (tmp / "a").write_text("x"))
    with pytest.raises(PsyfaceError, match="part of that path is a file"):
        write_atomic(notes / "metrics.json", lambda tmp: tmp.write_text("x"))
    assert notes.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
