"""Mesh shapes from the config, logical-axis rules, cluster detection and the multi-process
command-line flags: fast checks, no fake devices needed (shapes are computed for any device
count; specs are built against an AbstractMesh)."""

from __future__ import annotations

import copy
import itertools
import subprocess
from pathlib import Path

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from jaxformer import cli
from jaxformer.config import Config, ConfigError, MeshConfig, apply_overrides
from jaxformer.errors import UserError
from jaxformer.parallel.distributed import cluster_detected, initialize
from jaxformer.parallel.mesh import MESH_AXES, PRESET_SIZES, make_mesh, mesh_shape
from jaxformer.parallel.sharding import PRESET_RULES, logical_to_spec, rules_for

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = str(ROOT / "experiments" / "gpt_tiny.py")


def shape(n: int, **kw) -> dict[str, int]:
    """Only the axes of size > 1, for short expectations."""
    return {a: s for a, s in mesh_shape(MeshConfig(**kw), n).items() if s != 1}


def abstract_mesh(**sizes: int) -> AbstractMesh:
    return AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)


# --- mesh_shape ------------------------------------------------------------------------------

@pytest.mark.parametrize("preset, expected", [
    ("data", {"data": 8}),
    ("fsdp", {"fsdp": 8}),
    ("fsdp_tensor", {"fsdp": 4, "tensor": 2}),
    ("sequence", {"sequence": 8}),
    ("expert", {"expert": 8}),
])
def test_preset_sizes(preset, expected):
    assert shape(8, preset=preset) == expected
    sizes = mesh_shape(MeshConfig(preset=preset), 8)
    assert tuple(sizes) == MESH_AXES  # always all five axes, in mesh order


def test_every_preset_fills_the_devices():
    assert set(PRESET_SIZES) == set(PRESET_RULES)
    for preset, n in itertools.product(PRESET_SIZES, (2, 4, 8, 16)):
        sizes = mesh_shape(MeshConfig(preset=preset), n)
        assert sizes["data"] * sizes["fsdp"] * sizes["expert"] * sizes["sequence"] \
            * sizes["tensor"] == n, (preset, n, sizes)


def test_one_device_is_all_ones():
    assert shape(1) == {} and shape(1, preset="fsdp") == {}
    mesh = make_mesh(MeshConfig(preset="fsdp"), jax.devices()[:1])
    assert mesh.axis_names == MESH_AXES and mesh.size == 1


@pytest.mark.parametrize("kw, n, expected", [
    ({"data": -1}, 8, {"data": 8}),
    ({"preset": "fsdp", "data": -1}, 8, {"data": 8}),  # the user's -1 replaces the preset's
    ({"preset": "fsdp", "data": 2, "fsdp": -1}, 8, {"data": 2, "fsdp": 4}),
    ({"preset": "fsdp", "fsdp": 2, "data": -1}, 8, {"data": 4, "fsdp": 2}),
    ({"preset": "fsdp_tensor", "tensor": -1}, 8, {"tensor": 8}),
    ({"preset": "data", "tensor": -1, "data": 2}, 16, {"data": 2, "tensor": 8}),
])
def test_minus_one_fills_the_remaining_devices(kw, n, expected):
    assert shape(n, **kw) == expected


@pytest.mark.parametrize("kw, n, expected", [
    ({"preset": "fsdp", "data": 2}, 8, {"data": 2, "fsdp": 4}),  # preset fills the rest
    ({"preset": "fsdp_tensor", "tensor": 4}, 8, {"fsdp": 2, "tensor": 4}),
    ({"preset": "fsdp_tensor", "expert": 2, "tensor": 2}, 8, {"fsdp": 2, "expert": 2,
                                                              "tensor": 2}),
    ({"preset": "expert", "data": 2}, 16, {"data": 2, "expert": 8}),
    ({"preset": "sequence", "fsdp": 2}, 8, {"fsdp": 2, "sequence": 4}),
    ({"data": 2}, 8, {"data": 2}),  # every size explicit: a mesh over the first 2 devices
    ({"preset": "fsdp", "fsdp": 4, "tensor": 2}, 8, {"fsdp": 4, "tensor": 2}),
])
def test_explicit_sizes_with_preset_fill(kw, n, expected):
    assert shape(n, **kw) == expected


def test_explicit_smaller_mesh_takes_the_first_devices():
    mesh = make_mesh(MeshConfig(data=1), jax.devices())
    assert mesh.size == 1 and mesh.devices.flat[0] == jax.devices()[0]


@pytest.mark.parametrize("kw, n, needle", [
    ({"data": 3}, 8, "data=3"),
    ({"preset": "fsdp_tensor"}, 3, "tensor=2"),  # tensor=2 does not divide 3 devices
    ({"preset": "fsdp", "tensor": 16}, 8, "tensor=16"),
    ({"data": 16}, 8, "8 device"),
    ({"data": 2, "tensor": 3}, 8, "tensor=3"),
])
def test_sizes_that_do_not_fit_are_a_one_line_user_error(kw, n, needle):
    with pytest.raises(UserError) as e:
        mesh_shape(MeshConfig(**kw), n)
    message = str(e.value)
    assert "\n" not in message and needle in message, message


@pytest.mark.parametrize("overrides, needle", [
    (["mesh.data=-1", "mesh.fsdp=-1"], "at most one mesh axis may be -1"),
    (["mesh.tensor=-1", "mesh.sequence=-1"], "mesh.tensor=-1, mesh.sequence=-1"),
    (["mesh.data=-2"], "mesh.data"),
    (['mesh.rules=["embed"]'], "bad mesh rule 'embed'"),
    (['mesh.rules=["embed=fsdp", "mlp=bogus"]'], "bad mesh rule 'mlp=bogus'"),
    (['mesh.rules=["=fsdp"]'], "bad mesh rule '=fsdp'"),
    (['mesh.rules=["batch=data+model"]'], "bad mesh rule"),
    (["mesh.rules=embed=fsdp"], "mesh.rules"),  # not a JSON list
    (["mesh.preset=bogus"], "mesh.preset"),
])
def test_bad_mesh_config_is_a_config_error(overrides, needle):
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), overrides)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_good_mesh_overrides_pass_validation():
    cfg = apply_overrides(Config(), ["mesh.preset=fsdp_tensor", "mesh.tensor=-1",
                                     'mesh.rules=["embed=", "batch=data+fsdp"]'])
    assert cfg.mesh.tensor == -1 and cfg.mesh.rules == ("embed=", "batch=data+fsdp")


# --- rules and specs -------------------------------------------------------------------------

def test_rules_override_single_entries():
    presets = copy.deepcopy(PRESET_RULES)
    rules = rules_for(MeshConfig(preset="fsdp", rules=("embed=", "batch=data+fsdp",
                                                       " mlp = tensor + fsdp ")))
    assert rules["embed"] == ()  # replicated
    assert rules["batch"] == ("data", "fsdp")
    assert rules["mlp"] == ("tensor", "fsdp")
    assert rules["vocab"] == PRESET_RULES["fsdp"]["vocab"]  # the rest is the preset's
    assert presets == PRESET_RULES  # the preset table itself is unchanged
    mesh = abstract_mesh(fsdp=8)
    assert logical_to_spec(("embed", "mlp"), rules, (32, 128), mesh) == PartitionSpec(
        None, "fsdp")


def test_spec_without_mesh_maps_names():
    rules = PRESET_RULES["fsdp_tensor"]
    assert logical_to_spec(("batch", "length"), rules) == PartitionSpec(
        ("data", "fsdp", "expert"), None)
    assert logical_to_spec(("embed", "heads", None), rules) == PartitionSpec(
        "fsdp", "tensor", None)


def test_spec_drops_size_one_axes():
    rules = PRESET_RULES["data"]
    assert logical_to_spec(("batch", "length"), rules, (8, 16), abstract_mesh(data=8)) == \
        PartitionSpec("data", None)
    assert logical_to_spec(("batch", "length"), rules, (8, 16), abstract_mesh(fsdp=4)) == \
        PartitionSpec("fsdp", None)
    assert logical_to_spec(("batch", "length"), rules, (8, 16), abstract_mesh()) == \
        PartitionSpec(None, None)


def test_non_divisible_dimension_stays_replicated():
    rules = PRESET_RULES["fsdp"]
    mesh = abstract_mesh(fsdp=4)
    # embed 30 is not divisible by 4: replicated, and fsdp is then free for the mlp dimension
    assert logical_to_spec(("embed", "mlp"), rules, (30, 64), mesh) == PartitionSpec(
        None, "fsdp")
    assert logical_to_spec(("embed", "mlp"), rules, (30, 30), mesh) == PartitionSpec(
        None, None)
    # vocab over tensor x fsdp = 8 needs a multiple of 8
    rules = PRESET_RULES["fsdp_tensor"]
    mesh = abstract_mesh(fsdp=4, tensor=2)
    assert logical_to_spec(("vocab", "embed"), rules, (300, 32), mesh) == PartitionSpec(
        None, "fsdp")
    assert logical_to_spec(("vocab", "embed"), rules, (304, 32), mesh) == PartitionSpec(
        ("tensor", "fsdp"), None)


def test_a_mesh_axis_is_used_once():
    rules = PRESET_RULES["fsdp"]
    mesh = abstract_mesh(fsdp=4)
    assert logical_to_spec(("embed", "mlp"), rules, (32, 64), mesh) == PartitionSpec(
        "fsdp", None)
    assert logical_to_spec(("embed", "heads", "head_dim"), rules, (32, 4, 8), mesh) == \
        PartitionSpec("fsdp", None, None)
    rules = PRESET_RULES["fsdp_tensor"]
    mesh = abstract_mesh(fsdp=4, tensor=2)
    # mlp -> (tensor, fsdp), but embed took fsdp already
    assert logical_to_spec(("embed", "mlp"), rules, (32, 128), mesh) == PartitionSpec(
        "fsdp", "tensor")
    assert logical_to_spec(("mlp", "embed"), rules, (128, 32), mesh) == PartitionSpec(
        ("tensor", "fsdp"), None)


NAMES = [None, "batch", "length", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab",
         "experts", "layers", "act_heads", "act_mlp", "act_vocab"]


@pytest.mark.parametrize("preset", sorted(PRESET_RULES))
def test_specs_never_repeat_an_axis_and_always_divide(preset):
    rules = rules_for(MeshConfig(preset=preset))
    sizes = mesh_shape(MeshConfig(preset=preset, tensor=2 if preset == "fsdp_tensor" else 0), 8)
    mesh = AbstractMesh(tuple(sizes.values()), MESH_AXES)
    dims = (6, 8)
    for axes in itertools.product(NAMES, repeat=3):
        for shp in itertools.product(dims, repeat=3):
            spec = logical_to_spec(axes, rules, shp, mesh)
            used = [a for entry in spec if entry for a in
                    (entry if isinstance(entry, tuple) else (entry,))]
            assert len(used) == len(set(used)), (axes, shp, spec)
            for dim, entry in zip(shp, spec, strict=True):
                if entry:
                    names = entry if isinstance(entry, tuple) else (entry,)
                    n = 1
                    for a in names:
                        n *= sizes[a]
                    assert dim % n == 0 and n > 1, (axes, shp, spec)


# --- multi-process start-up ------------------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "123", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_JOB_ID": "123", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "123"}, None),  # an allocation without srun tasks: one process
    ({"SLURM_JOB_ID": "123", "SLURM_NPROCS": "2"}, "slurm"),
    ({"SLURM_NTASKS": "4"}, None),  # no job
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "a"}, None),  # single-host TPU VM
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1"}, "tpu"),
])
def test_cluster_detected(env, expected):
    assert cluster_detected(env) == expected


@pytest.mark.parametrize("args", [
    ("localhost:1234", None, None),
    ("localhost:1234", 2, None),
    (None, 2, 0),
    (None, None, 1),
])
def test_initialize_with_partial_flags_is_a_user_error(args):
    with pytest.raises(UserError, match="--coordinator HOST:PORT, --num-processes N and "
                                        "--process-id I"):
        initialize(*args)


@pytest.mark.parametrize("pid", [-1, 2, 5])
def test_initialize_with_process_id_out_of_range(pid):
    with pytest.raises(UserError, match=rf"--process-id {pid} must be in \[0, 2\)"):
        initialize("localhost:1234", 2, pid)


def test_initialize_one_process_is_not_distributed():
    assert initialize("localhost:1234", 1, 0) is False


def _cli_error(capsys, *argv: str) -> str:
    status = cli.main(list(argv))
    err = capsys.readouterr().err
    assert status == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_cli_coordinator_without_the_other_flags(capsys):
    line = _cli_error(capsys, "train", EXPERIMENT, "--coordinator", "x:1")
    assert "--num-processes N" in line and "--process-id I" in line


def test_cli_process_id_out_of_range(capsys):
    line = _cli_error(capsys, "train", EXPERIMENT, "--coordinator", "x:1", "--num-processes",
                      "2", "--process-id", "2")
    assert "--process-id 2" in line


def test_cli_bad_mesh_preset(capsys):
    line = _cli_error(capsys, "train", EXPERIMENT, "--set", "mesh.preset=bogus")
    assert "mesh.preset" in line and "bogus" in line


def test_cli_two_fill_axes(capsys):
    line = _cli_error(capsys, "train", EXPERIMENT, "--set", "mesh.data=-1", "--set",
                      "mesh.fsdp=-1")
    assert "at most one mesh axis" in line


# --- example cluster scripts -----------------------------------------------------------------

@pytest.mark.parametrize("script", ["slurm_train.sh", "tpu_pod_train.sh"])
def test_cluster_scripts_are_valid_bash(script):
    path = ROOT / "scripts" / script
    out = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = path.read_text()
    assert "jaxformer train" in text and "mesh.preset=fsdp" in text
    if script == "slurm_train.sh":
        assert "#SBATCH --nodes=2" in text and "srun" in text
    else:
        assert "--worker=all" in text and "gcloud compute tpus tpu-vm ssh" in text
