"""The command line as a user meets it: clear one-line errors with exit 2, nothing in an
existing run dir changed; train, sample and bench work end to end on tiny settings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.command_line import EXPERIMENT, ROOT, assert_user_error, jaxformer, snapshot
from tests.corpus import write_corpus

TINY = ["--set", "model.n_layers=1", "--set", "model.d_model=32", "--set", "model.n_heads=2",
        "--set", "model.vocab_size=300", "--set", "data.seq_len=32", "--set", "model.max_len=64",
        "--set", "train.batch_size=4", "--set", "train.steps=4", "--set", "train.warmup_steps=1",
        "--set", "eval.every=2", "--set", "eval.batches=1", "--set", "log.every=2",
        "--set", "checkpoint.every=2", "--set", "sample.max_new_tokens=5"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished tiny run on a corpus holding one non-UTF-8 file."""
    tmp = tmp_path_factory.mktemp("cli")
    corpus = write_corpus(tmp / "corpus", n_docs=30)
    (corpus / "latin1.txt").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    run = tmp / "run"
    # No --no-progress: output to a pipe (not a terminal) must not fill up with bar redraws.
    out = jaxformer("train", EXPERIMENT, *TINY, "--set", f"data.source={corpus}",
                    "--run-dir", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    return corpus, run, out


def test_train_reports_skipped_file_eval_and_samples(trained_run):
    corpus, run, out = trained_run
    text = out.stdout + out.stderr
    # the latin-1 file is counted, not fatal
    assert f"(skipped 1 of 31 files: 1 not UTF-8; e.g. {corpus / 'latin1.txt'})" in text
    assert "eval loss" in text and "perplexity" in text
    assert "samples" in text
    assert "done: step 4" in out.stdout
    assert "step/s" not in text and "s/step" not in text  # no progress-bar snapshots
    for name in ("config.json", "tokenizer.json", "samples.txt"):
        assert (run / name).exists(), name
    assert any(p.name.startswith("events.out.tfevents") for p in run.iterdir())


@pytest.mark.parametrize("args, needles", [
    (["--set", "model.dmodel=64"], ["unknown config key 'model.dmodel'", "model.d_model"]),
    (["--set", "train.steps=ten"], ["train.steps", "'ten'", "int"]),
    (["--set", "train.lr"], ["KEY=VALUE"]),
    (["--set", "data.source=/nonexistent/corpus"], ["/nonexistent/corpus"]),
])
def test_bad_input_is_one_line_exit_2_and_run_dir_untouched(trained_run, args, needles):
    _, run, _ = trained_run
    before = snapshot(run)
    out = jaxformer("train", EXPERIMENT, *TINY, *args, "--run-dir", str(run), "--no-progress")
    assert_user_error(out, *needles)
    assert snapshot(run) == before


def test_empty_data_dir_and_all_bad_files(tmp_path, trained_run):
    _, run, _ = trained_run
    before = snapshot(run)
    empty = tmp_path / "empty"
    empty.mkdir()
    out = jaxformer("train", EXPERIMENT, *TINY, "--set", f"data.source={empty}",
                    "--run-dir", str(run))
    assert_user_error(out, str(empty))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.txt").write_bytes(b"\xff\xfe\xfa not utf-8")
    out = jaxformer("train", EXPERIMENT, *TINY, "--set", f"data.source={bad}",
                    "--run-dir", str(run))
    assert_user_error(out, str(bad))
    assert snapshot(run) == before


def test_missing_experiment_file(tmp_path):
    out = jaxformer("train", str(tmp_path / "nope.py"))
    assert_user_error(out, "experiment file not found", "nope.py")


def test_conflicting_run_dir_is_refused(trained_run):
    corpus, run, _ = trained_run
    before = snapshot(run)
    out = jaxformer("train", EXPERIMENT, *TINY, "--set", f"data.source={corpus}",
                    "--set", "train.lr=0.5", "--run-dir", str(run))
    assert_user_error(out, "train.lr", "--allow-config-change")
    assert snapshot(run) == before


def test_sample_greedy_is_deterministic(trained_run):
    _, run, _ = trained_run
    args = ["sample", str(run), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0"]
    a, b = jaxformer(*args), jaxformer(*args)
    assert a.returncode == 0, a.stderr[-2000:]
    assert a.stdout.startswith("def ") and a.stdout == b.stdout
    out = jaxformer("sample", str(run), "--prompt", "def ", "--max-new-tokens", "1000")
    assert_user_error(out, "max_len")
    assert_user_error(jaxformer("sample", str(run.parent / "nope")), "nope", "jaxformer run dir")


def test_bench_prints_json_last_line():
    out = jaxformer("bench", EXPERIMENT, *TINY, "--steps", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("params", "tokens_per_sec", "step_time_s", "compile_s", "flops_per_token",
                "mfu_percent", "device"):
        assert key in result, key
    # 1 layer, d 32, vocab 300, T 32: 6 * (4*32^2 + 2*32*128 + 300*32) + 6*1*32*32
    assert result["flops_per_token"] == 6 * (4 * 32**2 + 2 * 32 * 128 + 300 * 32) + 6 * 32 * 32
    assert result["tokens_per_sec"] > 0 and 0 < result["mfu_percent"] < 100


def test_sample_prompt_cache_and_flag_errors(trained_run, tmp_path, capsys):
    """--save-prompt-cache then --prompt-cache prints what the whole prompt's ids give; flags
    that conflict or are out of range are one error line, exit 2, the run dir unchanged."""
    from jaxformer.cli import main
    from jaxformer.inference.restore import load_for_generation

    _, run, _ = trained_run
    before = snapshot(run)
    cache = tmp_path / "system.npz"
    assert main(["sample", str(run), "--prompt", "import os\n", "--save-prompt-cache",
                 str(cache)]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--prompt-cache", str(cache), "--prompt", "def ",
                 "--temperature", "0", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    loaded = load_for_generation(run)
    # (The trailing space of a prompt is dropped, as without a cache.)
    ids = loaded.encode("import os\n") + list(loaded.tokenizer.encode(
        "def", add_special_tokens=False).ids)
    gen = loaded.generator().generate([ids], 6, stop_tokens=loaded.specials.eos_ids)[0]
    assert printed == "import os\ndef" + gen.text + "\n"
    # Speculative decoding with the run as its own draft: the greedy text, all accepted.
    greedy = ["sample", str(run), "--prompt", "def ", "--temperature", "0",
              "--max-new-tokens", "6"]
    assert main(greedy) == 0
    plain = capsys.readouterr().out
    assert main([*greedy, "--draft", str(run), "--draft-k", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == plain and "(100%)" in out.err
    assert main(["sample", str(run), "--prompt", "def ", "--num-beams", "2",
                 "--num-return-sequences", "2", "--max-new-tokens", "4"]) == 0
    beams = capsys.readouterr().out.strip().split("\n\n")
    assert len(beams) == 2 and all(b.startswith("[score -") for b in beams)
    for flags, message in [
            (["--num-beams", "2", "--temperature", "0.5"], "drop --temperature"),
            (["--top-p", "1.5"], "--top-p"),
            (["--stop-token", "no-such-token"], "not a token"),
            (["--num-beams", "2", "--num-return-sequences", "3"], "--num-return-sequences"),
            (["--prompt-cache", str(tmp_path / "missing.npz")], "cannot read the prompt cache"),
            (["--prompt", "a", "--prompt", "b", "--draft", str(run)], "one prompt")]:
        assert main(["sample", str(run), *flags]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (flags, err)
    assert snapshot(run) == before


def test_bench_decode_speculative_on_held_out_prompts(trained_run):
    """scripts/bench_decode.py --draft as docs/benchmarks.md runs it, with the run as its own
    draft: every draft token accepted, so each target call yields k + 1 tokens, and the output
    is the target's own on every held-out prompt."""
    _, run, _ = trained_run
    before = snapshot(run)
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_decode.py"), "--target", str(run), "--draft",
         str(run), "--k", "3", "--prompts", "2", "--prompt-len", "4", "--new", "6", "--reps",
         "1", "--pause", "0"], capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines()
            if line.startswith("| ")]
    assert [r[0] for r in rows[1:]] == ["0", "1", "all 2"]  # after the header
    for row in rows[1:]:
        assert row[4:] == ["True", "100%", "4.00"], row
    assert "2 held-out prompts of 4 tokens" in out
    assert snapshot(run) == before


def test_efficient_families_train_and_linear_attention_samples(tmp_path, trained_run):
    """A family that cannot decode still trains (its end-of-run samples skipped, with a
    note); a linear-attention run decodes with its running state, from the command line."""
    corpus, _, _ = trained_run
    common = [*TINY, "--set", f"data.source={corpus}", "--set", "model.attention_block=8",
              "--no-progress"]
    out = jaxformer("train", EXPERIMENT, *common, "--set", "model.attention_type=performer",
                    "--run-dir", str(tmp_path / "performer"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "samples skipped: model.attention_type='performer'" in out.stdout
    linear = tmp_path / "linear"
    out = jaxformer("train", EXPERIMENT, *common, "--set", "model.attention_type=linear",
                    "--run-dir", str(linear))
    assert out.returncode == 0, out.stderr[-3000:]
    assert (linear / "samples.txt").is_file()
    out = jaxformer("sample", str(linear), "--prompt", "def ", "--max-new-tokens", "6",
                    "--temperature", "0")
    assert out.returncode == 0 and out.stdout.startswith("def "), out.stderr[-2000:]
    assert_user_error(jaxformer("sample", str(linear), "--prompt", "def ", "--draft",
                                str(linear)), "speculative decoding needs a per-slot KV cache")


def test_classifier_run_ends_with_its_accuracy_against_the_majority_class(tmp_path):
    """The run's last line gives its accuracy beside the majority class's, and a family that
    cannot decode adds no note about skipped samples: a classifier samples nothing."""
    out = jaxformer("train", "experiments/lra_listops.py", "--set", "train.steps=2",
                    "--set", "eval.every=2", "--set", "eval.batches=1", "--set", "data.seq_len=64",
                    "--set", "model.max_len=64", "--set", "model.attention_type=longformer",
                    "--set", "model.attention_block=16", "--no-progress",
                    "--run-dir", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr[-3000:]
    done = next(line for line in out.stdout.splitlines() if line.startswith("done:"))
    assert "accuracy " in done and "majority class baseline" in done and "unigram" not in done
    assert "samples" not in out.stdout
