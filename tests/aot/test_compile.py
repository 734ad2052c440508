"""`jaxformer compile`: the real train step compiled for a TPU topology on this CPU machine
(libtpu installed by the dev extras), run through the command as a user runs it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jaxformer.objectives  # noqa: F401 - registers the objectives' config checks
from jaxformer import cli
from jaxformer import config as config_lib
from jaxformer.aot import chips
from jaxformer.config import load_experiment
from jaxformer.models.build import abstract_model
from jaxformer.train.flops import count_params

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", "model.n_layers=2", "--set", "model.d_model=128", "--set", "model.n_heads=4",
        "--set", "model.n_kv_heads=2", "--set", "model.vocab_size=1024",
        "--set", "model.max_len=128", "--set", "data.seq_len=128", "--set", "train.batch_size=8",
        "--set", "model.compute_dtype=bfloat16", "--set", "model.scan_layers=true",
        "--set", "mesh.preset=fsdp"]


def run(capsys, *args: str) -> tuple[int, str, str]:
    status = cli.main(["compile", str(ROOT / "experiments/llama_tiny.py"), *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_tiny_model_compiles_for_a_v5e_slice(capsys, tmp_path):
    status, out, _ = run(capsys, "--topology", "v5e:2x2", *TINY, "--dump", str(tmp_path))
    assert status == 0
    # the dumped programs: JAX's dots before, the TPU's fusions and collectives after
    assert " dot(" in (tmp_path / "train_step.hlo").read_text()
    assert "all-gather" in (tmp_path / "train_step.compiled.hlo").read_text()
    report = json.loads(out.strip().splitlines()[-1])
    assert report["fits"] and "fits," in out
    assert report["chips"] == 4 and report["mesh"]["fsdp"] == 4
    assert report["attention"] == "splash"  # the TPU kernel, lowered for the TPU, not the CPU's
    # Parameters and both Adam moments are float32 and split four ways (FSDP).
    params = report["params"]
    assert report["params_bytes"] == pytest.approx(4 * params / 4, rel=0.02)
    assert report["opt_state_bytes"] == pytest.approx(2 * 4 * params / 4, rel=0.02)
    assert report["total_bytes"] > report["params_bytes"] + report["opt_state_bytes"]
    # The program's matmuls (loops at their trip count) agree with 6N + 6LTNH within 5%
    # (the rest: the causal mask's wasted half inside no kernel, norms, the optimizer).
    assert report["hlo_flops_per_chip"] == pytest.approx(report["model_flops_per_chip"],
                                                         rel=0.05)
    # XLA's own count sees the scanned layer body once: well below the real count.
    assert report["xla_counts_loops_once"]
    assert report["xla_flops"] < 0.8 * report["hlo_flops_per_chip"]
    # FSDP all-gathers the weights: at least each chip's missing 3/4 of the bf16 weights.
    assert report["collective_bytes"]["all-gather"] >= 0.75 * 2 * params * 0.9
    assert report["limited_by"] in ("compute", "memory", "collectives")
    assert report["step_s"] == max(report["compute_s"], report["memory_s"],
                                   report["collectives_s"])
    # MFU: model FLOPs over what v5e's 197 TFLOP/s would do in the estimated step time
    assert report["mfu_percent"] == pytest.approx(
        100 * report["model_flops_per_chip"] / (197e12 * report["step_s"]), rel=2e-3)


def test_two_slices_with_data_parallelism_across_them(capsys):
    status, out, _ = run(capsys, "--topology", "v5e:2x2", "--slices", "2", *TINY,
                         "--set", "mesh.data=2")
    assert status == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert report["chips"] == 8 and report["slices"] == 2
    assert report["mesh"]["data"] == 2 and report["mesh"]["fsdp"] == 4
    # gradients are summed across the two data-parallel halves
    assert report["collective_bytes"]["all-reduce"] > 0 and report["fits"]


@pytest.mark.parametrize("experiment,preset", [("llama_tiny", "sequence"),
                                               ("moe_tiny", "expert")])
def test_sequence_and_expert_meshes_compile(capsys, experiment, preset):
    """The presets beyond FSDP, data and FSDP x tensor (those: the sweep test): activations
    split along the sequence, and MoE experts split over the chips."""
    experts = ["--set", "model.n_experts=4"] if experiment == "moe_tiny" else []
    status = cli.main(["compile", str(ROOT / f"experiments/{experiment}.py"), "--topology",
                       "v5e:2x2", *TINY, "--set", f"mesh.preset={preset}", *experts])
    out, _ = capsys.readouterr()
    assert status == 0
    report = json.loads(out.strip().splitlines()[-1])
    assert report["fits"] and report["mesh"][preset] == 4 and report["mesh_preset"] == preset
    if preset == "sequence":  # weights FSDP over the sequence axis, gathered where used
        assert report["collective_bytes"]["all-gather"] > 0
        assert report["params_bytes"] == pytest.approx(4 * report["params"] / 4, rel=0.02)
    else:  # the experts (most of this model's weights) split four ways, the rest replicated
        assert report["params_bytes"] < 0.6 * 4 * report["params"]


def test_a_model_too_large_for_the_chip_is_reported(capsys):
    status, out, _ = run(capsys, "--topology", "v5e:2x2", "--set", "model.d_model=4096",
                         "--set", "model.n_heads=32", "--set", "model.n_kv_heads=8",
                         "--set", "model.n_layers=6", "--set", "model.vocab_size=32000",
                         "--set", "model.scan_layers=true")
    assert status == 4
    report = json.loads(out.strip().splitlines()[-1])
    assert not report["fits"] and "DOES NOT FIT" in out
    # 1.3B parameters, replicated (data parallel): 16 bytes each with Adam > 16 GiB
    assert report["total_bytes"] > report["hbm_bytes"]
    assert report["hbm_bytes"] == pytest.approx(15.75 * 2**30, rel=0.01)


def test_sweep_prints_what_fits_and_the_best(capsys):
    status, out, _ = run(capsys, "--topology", "v5e:2x2", *TINY, "--sweep",
                         "--presets", "fsdp,data", "--remats", "full")
    assert status == 0
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["mesh_preset"], r["remat"]) for r in rows] == [("fsdp", "full"), ("data", "full")]
    assert all(r["fits"] for r in rows)
    best = max(rows, key=lambda r: r["mfu_percent"])
    assert f"best: mesh.preset={best['mesh_preset']} model.remat=full" in out
    # data parallel holds every weight on every chip; FSDP a quarter of them
    assert rows[1]["params_bytes"] == pytest.approx(4 * rows[0]["params_bytes"], rel=0.02)


def test_missing_tpu_compiler_says_how_to_install(capsys, monkeypatch):
    real = chips.importlib.util.find_spec
    monkeypatch.setattr(chips.importlib.util, "find_spec",
                        lambda name, *a: None if name == "libtpu" else real(name, *a))
    status, out, err = run(capsys, "--topology", "v5e:2x2")
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and 'pip install "jax[tpu]"' in err


@pytest.mark.parametrize("topology", ["v9x:2x2", "v5e", "v5e:2xq"])
def test_bad_topology_is_one_line(capsys, topology):
    status, _, err = run(capsys, "--topology", topology)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("name,size", [("gpt2_124m", 0.124e9), ("gpt2_1_5b", 1.56e9),
                                       ("llama3_8b", 8.03e9), ("dense_32b", 32.8e9),
                                       ("llama2_70b", 69.0e9)])
def test_scale_presets_have_their_size(name, size):
    cfg = load_experiment(ROOT / f"experiments/scale/{name}.py")
    _, state = abstract_model(cfg.model)  # shapes only: nothing allocated
    assert count_params(state) == pytest.approx(size, rel=0.01)
    assert cfg.model.compute_dtype == "bfloat16" and cfg.model.scan_layers
    assert cfg.data.seq_len <= cfg.model.max_len and math.log2(cfg.train.batch_size) % 1 == 0


def test_commands_on_a_machine_without_tpu_print_no_tpu_runtime_noise(tmp_path):
    """libtpu (installed for `compile`) would start the TPU runtime before every JAX program
    and print its failure on a machine without a TPU; the command picks this machine's
    platforms first."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-m", "jaxformer.cli", "plot", "--schedule",
                          str(ROOT / "experiments/gpt_tiny.py"), "--out",
                          str(tmp_path / "lr.png")], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr
    assert (tmp_path / "lr.png").stat().st_size > 0


def test_scripts_and_the_python_api_print_no_tpu_runtime_noise():
    """The same for a program that imports jaxformer, as the scripts and API users do: the
    platform choice happens when the package is imported, before JAX starts a backend."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    code = ("import jax, jax.numpy as jnp\nimport jaxformer.inference\n"
            "print(jax.default_backend(), float(jnp.ones(3).sum()))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cpu", "3.0"], out.stdout
    assert "TPU" not in out.stderr and "libtpu" not in out.stderr, out.stderr


def test_a_lora_experiment_compiles_with_its_flop_count(capsys):
    """A LoRA step lowers without weights (the base goes in as shapes); the report counts the
    model's parameters and its FLOPs leave out the frozen weights' gradients (4N + 2N_t + 6LTNH),
    which the program's own matmuls confirm within 5%."""
    lora = ["--set", "train.init_from=", "--set", "lora.rank=4", "--set", 'lora.targets=["all"]',
            "--set", "model.scan_layers=false", "--set", "model.compute_dtype=float32",
            "--set", "data.source=synthetic:copy"]
    status = cli.main(["compile", str(ROOT / "experiments/lora_tiny.py"), "--topology",
                       "v5e:2x2", *TINY, *lora])
    out, err = capsys.readouterr()
    assert status == 0, err[-2000:]
    report = json.loads(out.strip().splitlines()[-1])
    assert "by the 4N + 2N_t + 6LTNH formula" in out
    cfg = load_experiment(ROOT / "experiments/lora_tiny.py")
    cfg = config_lib.apply_overrides(cfg, [a for a in TINY + lora if a != "--set"])
    assert report["params"] == count_params(abstract_model(cfg.model)[1])
    assert report["hlo_flops_per_chip"] == pytest.approx(report["model_flops_per_chip"],
                                                         rel=0.05)
