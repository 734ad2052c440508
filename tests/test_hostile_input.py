"""Hostile and malformed input on the command line: every failure a user can cause ends with
one ``error:`` line naming the bad thing, exit status 2, no traceback and nothing written.

Covers experiment files that raise, run-dir paths that are files, bad sample/bench flags, and
garbage files in a run dir (config.json, tokenizer.json, TensorBoard events) or in a Hugging
Face directory (config.json, model.safetensors). Corrupt checkpoints are tests/runs' business.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from jaxformer import cli
from jaxformer.train.loop import train
from tests.command_line import EXPERIMENT, snapshot
from tests.corpus import write_corpus
from tests.train.helpers import run_config


def run_cli(capsys, *args: str) -> str:
    """``jaxformer ARGS`` in this process; asserts exit 2, one ``error:`` line and no
    traceback, and returns that line."""
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished 2-step tiny run (config, tokenizer, checkpoint, event file)."""
    tmp = tmp_path_factory.mktemp("hostile")
    corpus = write_corpus(tmp / "corpus", n_docs=20)
    run = tmp / "run"
    train(run_config(str(corpus), "train.steps=2", "train.warmup_steps=1",
                     "checkpoint.every=2", "eval.every=2", "eval.batches=1"),
          run, echo=lambda _: None, progress=False)
    return run


@pytest.fixture
def copy_of(run_dir, tmp_path):
    """A private copy of the run dir to corrupt."""
    def make(name: str = "run") -> Path:
        return Path(shutil.copytree(run_dir, tmp_path / name))
    return make


# --- experiment files --------------------------------------------------------------------------

def test_experiment_that_fails_at_import_names_its_own_line(tmp_path, capsys):
    bad = tmp_path / "bad_import.py"
    bad.write_text("import dataclasses\n\nX = undefined_name + 1\n\n\ndef config():\n    pass\n")
    line = run_cli(capsys, "train", bad, "--run-dir", tmp_path / "run")
    assert f"{bad}:3 in module level: NameError:" in line and "undefined_name" in line, line
    assert not (tmp_path / "run").exists()


def test_experiment_whose_config_raises_names_the_deepest_line_in_it(tmp_path, capsys):
    bad = tmp_path / "bad_config.py"
    bad.write_text("def helper(n):\n    return 1 / n\n\n\ndef config():\n    return helper(0)\n")
    line = run_cli(capsys, "train", bad, "--run-dir", tmp_path / "run")
    assert line == f"error: {bad}:2 in helper(): ZeroDivisionError: division by zero", line
    assert not (tmp_path / "run").exists()


def test_experiment_with_multi_line_exception_message_stays_one_line(tmp_path, capsys):
    bad = tmp_path / "bad_msg.py"
    bad.write_text("def config():\n    raise ValueError('first\\nsecond')\n")
    line = run_cli(capsys, "train", bad)
    assert line.endswith(":2 in config(): ValueError: first second"), line


# --- paths and flags ---------------------------------------------------------------------------

def test_run_dir_that_is_a_file_is_refused_before_anything_is_written(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("mine\n")
    assert "is a file" in run_cli(capsys, "train", EXPERIMENT, "--run-dir", target)
    assert "is a file" in run_cli(capsys, "train", EXPERIMENT, "--run-dir", target / "sub")
    assert target.read_text() == "mine\n" and sorted(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("command", [["sample"], ["attention", "--text", "x", "--out", "o"],
                                     ["convert", "--out", "o", "--to-hf"]])
def test_read_commands_refuse_a_file_or_a_plain_dir_as_run_dir(tmp_path, capsys, command):
    (tmp_path / "file").write_text("x")
    (tmp_path / "plain").mkdir()
    for path in (tmp_path / "file", tmp_path / "plain"):
        line = run_cli(capsys, *command, path)
        assert str(path) in line and "run dir" in line, line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags, needle", [
    (["--max-new-tokens", "-5"], "--max-new-tokens"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--temperature", "nan"], "--temperature"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
    (["--top-k", "-1"], "--top-k"),
    (["--seed", str(2**40)], "--seed"),
])
def test_bad_sample_flags(run_dir, capsys, flags, needle):
    assert needle in run_cli(capsys, "sample", run_dir, *flags)


@pytest.mark.parametrize("flags, needle", [(["--steps", "-1"], "--steps"),
                                           (["--steps", "0"], "--steps"),
                                           (["--warmup", "-2"], "--warmup")])
def test_bad_bench_flags(capsys, flags, needle):
    assert needle in run_cli(capsys, "bench", EXPERIMENT, *flags)


# --- garbage files in a run dir ----------------------------------------------------------------

def test_garbage_tokenizer_json_in_run_dir(copy_of, capsys):
    run = copy_of()
    (run / "tokenizer.json").write_text("{ not a tokenizer")
    line = run_cli(capsys, "sample", run, "--max-new-tokens", "2")
    assert "tokenizer.json" in line, line


@pytest.mark.parametrize("content", [b"{ garbage", b'{"model": {"d_model": 3', b"[1, 2]",
                                     b'{"model": 5}', b'{"model": {"d_model": "wide"}}', b"",
                                     bytes(range(128, 256)) * 2],  # not UTF-8
                         ids=["garbage", "truncated", "list", "section", "type", "empty",
                              "binary"])
@pytest.mark.parametrize("command", [["sample"], ["convert", "--out", "OUT", "--to-hf"],
                                     ["attention", "--text", "x", "--out", "OUT"]],
                         ids=["sample", "convert", "attention"])
def test_garbage_config_json_in_run_dir(copy_of, tmp_path, capsys, content, command):
    run = copy_of()
    (run / "config.json").write_bytes(content)
    before = snapshot(run)
    out = tmp_path / "out"
    line = run_cli(capsys, *[out if a == "OUT" else a for a in command], run)
    assert "config.json" in line, line
    assert snapshot(run) == before and not out.exists()


def test_garbage_event_file_for_plot_and_runs(copy_of, tmp_path, capsys):
    run = copy_of()
    for f in run.glob("events.out.tfevents.*"):
        f.write_bytes(os.urandom(300))
    png = tmp_path / "plot.png"
    line = run_cli(capsys, "plot", run, "--out", png)
    assert "events.out.tfevents" in line and "TensorBoard" in line, line
    assert not png.exists()
    line = run_cli(capsys, "runs", run.parent)
    assert "events.out.tfevents" in line, line


# --- garbage Hugging Face directories ----------------------------------------------------------

@pytest.mark.parametrize("files, needle", [
    ({"config.json": b'{"model_type": "gpt2"}', "model.safetensors": os.urandom(512)},
     "model.safetensors"),
    ({"config.json": b'{"model_type": "gpt2"}',
      "model.safetensors": b"\xff" * 8 + b"{}"}, "model.safetensors"),
    ({"config.json": os.urandom(128), "model.safetensors": b""}, "config.json"),
    ({"config.json": b"{ nope", "model.safetensors": b""}, "config.json"),
    ({"config.json": b"[1]", "model.safetensors": b""}, "config.json"),
    ({"config.json": b'{"model_type": "gpt2"}', "model.safetensors.index.json": b"{}"},
     "model.safetensors.index.json"),
    ({"config.json": b'{"model_type": "gpt2"}', "pytorch_model.bin": b"\x80\x04pickle"},
     "pytorch_model.bin"),
], ids=["random-safetensors", "bad-header", "binary-config", "garbage-config", "list-config",
        "bad-index", "pickle-only"])
def test_garbage_hf_dir_for_convert_from_hf(tmp_path, capsys, files, needle):
    hf = tmp_path / "hf"
    hf.mkdir()
    for name, data in files.items():
        (hf / name).write_bytes(data)
    out = tmp_path / "out"
    line = run_cli(capsys, "convert", "--from-hf", hf, "--out", out)
    assert needle in line, line
    assert not out.exists()


def test_hf_config_json_with_wrong_fields(tmp_path, capsys):
    """Valid JSON, a supported model type, but not its fields: named, not a KeyError trace."""
    import numpy as np
    from safetensors.numpy import save_file

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": "wide"}))
    save_file({"x": np.zeros(2, np.float32)}, str(hf / "model.safetensors"))
    line = run_cli(capsys, "convert", "--from-hf", hf, "--out", tmp_path / "out")
    assert "config.json" in line or "gpt2" in line, line
    assert not (tmp_path / "out").exists()
