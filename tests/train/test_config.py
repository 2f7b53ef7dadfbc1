"""TrainConfig and the command line: each field type parses, each bad config gets its own clear error."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from models import presets
from train import cli
from train.config import (SET_BY_TRAINING, TrainConfig, parse_mesh, resolve_compute_dtype, resolve_mesh, validate,
                          validate_shapes)

ROOT = Path(__file__).resolve().parents[2]


def test_flags_parse_each_field_type(tmp_path):
    cfg, _ = cli.parse(["--lr", "3e-4", "--steps", "1000", "--no-resume", "--data", "a.txt", "b.jsonl",
                        "--mesh", "data=1,seq=8", "--compute_dtype", "float16", "--model.d-model", "64",
                        "--model.n-layers", "4",
                        "--model.softmax_layers", "1", "3", "--model.remat", "block", "--model.head-dim", "None",
                        "--run-dir", str(tmp_path)])
    assert cfg.lr == 3e-4 and cfg.steps == 1000 and cfg.resume is False and cfg.compute_dtype == "float16"
    assert cfg.data == ("a.txt", "b.jsonl") and cfg.mesh == "data=1,seq=8" and cfg.run_dir == str(tmp_path)
    assert cfg.model == presets.get("tnl-tiny").replace(d_model=64, n_layers=4, softmax_layers=(1, 3),
                                                         remat="block")


def test_flags_reproduce_a_config():
    """Every field but the model's that training sets itself: those have no flags and keep the file's values."""
    changed = dataclasses.replace(TrainConfig(), data=("a.txt", "b.jsonl"), resume=False, lr=3e-3, eos_token="",
                                  model=presets.get("tnl-1b-hybrid").replace(tie_embeddings=False, head_dim=None))
    file_model = cli.load_config_file(cli.DEFAULT_CONFIG).model
    for cfg in (TrainConfig(), changed, cli.load_config_file(cli.DEFAULT_CONFIG)):
        expected = cfg.model.replace(**{name: getattr(file_model, name) for name in SET_BY_TRAINING})
        assert cli.parse(cli.flags(cfg))[0] == dataclasses.replace(cfg, model=expected)


@pytest.mark.parametrize("argv, message", [
    (["--model.dtype", "bfloat16"], "--model.dtype: training sets the model's dtype itself, so this flag would "
                                    "be ignored; the model computes in --compute-dtype"),
    (["--model.param_dtype=bfloat16"], "--model.param_dtype: training sets the model's param_dtype itself"),
    (["--model.vocab-size", "512"], "--model.vocab-size: training sets the model's vocab_size itself, so this "
                                    "flag would be ignored; the model's vocabulary is the data's (--vocab-size"),
])
def test_model_flags_that_training_overrides_are_refused(argv, message, capsys):
    """Training sets these three model fields itself (before, `--model.dtype bfloat16` was accepted and did
    nothing). The missing data file makes the run fail fast where the flag is not refused."""
    status, err = _main([*argv, "--data", "/nonexistent/corpus.txt"], capsys)
    assert status == 2 and err.startswith(f"error: {message}"), err


def test_model_preset_replaces_the_files_model_before_the_model_flags():
    cfg, _ = cli.parse(["--model-preset", "tnl-1b-hybrid", "--model.strategy", "scan"])
    assert cfg.model == presets.get("tnl-1b-hybrid").replace(strategy="scan")
    assert cfg.steps == 1500  # the rest is still the config file's


@pytest.mark.parametrize("argv, message", [
    (["--lrr", "1"], "Unrecognized"),
    (["--lr", "fast"], "fast"),
    (["--steps", "1.5"], "1.5"),
    (["--model.remat", "sometimes"], "invalid choice 'sometimes'"),
    (["--model.strategy", "tree"], "invalid choice 'tree'"),
    (["--lr", "1e39"], "lr=1e+39 is not a finite float32 value"),
    (["--seq-len", "-3"], "seq_len must be positive"),
    (["--model.n-kv-heads", "3"], "n_kv_heads=3 must divide n_heads=4"),
    (["--set", "data=a.txt,b.txt"], "error: --set is gone: every field is a flag of its own, e.g. --data a.txt b.txt"),
])
def test_bad_flag_exits_2_naming_it(argv, message, capsys):
    status, err = _main(argv, capsys)
    assert status == 2 and message in err, err


def _main(argv, capsys) -> tuple[int, str]:
    """`python -m train ARGV`'s exit status and stderr (unwrapped from tyro's box). tyro exits for what it
    parses (model fields included); TrainConfig's own ValueError reaches main, which prints it."""
    from train.__main__ import main

    try:
        status = main(argv)
    except SystemExit as e:
        status = e.code
    return status, " ".join(capsys.readouterr().err.replace("│", " ").split())


def test_help_lists_every_field_with_its_choices(capsys):
    with pytest.raises(SystemExit) as e:
        cli.parse(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "--model.strategy {ring,allgather,scan}" in out and "--compute-dtype {auto,float32,bfloat16,float16}" in out
    assert "--model-preset" in out and "--coordinator" in out


@pytest.mark.parametrize("changes, message", [
    ({"steps": 0}, "steps must be positive"),
    ({"warmup_steps": 100, "decay_steps": 10}, r"decay_steps \(10\) must be >= warmup_steps \(100\)"),
    ({"b2": 1.0}, r"b2 must be in \[0, 1\)"),
    ({"val_fraction": 0.0}, "val_fraction must be in"),
    ({"lr": 1e39}, "lr=1e[+]39 is not a finite float32 value"),  # finite in Python, inf in float32
    ({"clip_norm": float("nan")}, "clip_norm=nan is not a finite float32 value"),
    ({"weight_decay": "0.1"}, "weight_decay must be a number"),
    ({"bin_dtype": "int8"}, r"bin_dtype must be one of \('uint16', 'uint32'\)"),
    ({"compute_dtype": "int8"}, "compute_dtype must be one of"),
    ({"platform": "rocm"}, "platform must be one of"),
    ({"platform": "cpu", "compute_dtype": "bfloat16"}, "compute_dtype=bfloat16 does not run on XLA:CPU"),
    ({"data": "corpus.txt"}, r"data must be a tuple, got 'corpus.txt' \(write \('corpus.txt',\)\)"),
    ({"model": "tnl-1b"}, "model must be a models.ModelConfig"),
    ({"mesh": "data=2,model=4"}, "unknown axis 'model'"),
    ({"mesh": "data=2,seq=x"}, "size of 'seq' must be an integer"),
])
def test_config_names_the_bad_field(changes, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


@pytest.mark.parametrize("changes, message", [
    ({"tokenizer": "/nonexistent/tokenizer.json"}, "neither 'byte' nor an existing tokenizer"),
    ({"data": ()}, "no data given"),
])
def test_validate_asks_for_what_a_run_needs(changes, message):
    with pytest.raises(ValueError, match=message):
        validate(TrainConfig(**changes))


def test_compute_dtype_auto_is_float32_on_cpu_only():
    assert resolve_compute_dtype("auto", "cpu") == "float32"
    assert resolve_compute_dtype("auto", "gpu") == "bfloat16"
    assert resolve_compute_dtype("float16", "cpu") == "float16"
    with pytest.raises(ValueError, match="bfloat16 does not run on XLA:CPU"):
        resolve_compute_dtype("bfloat16", "cpu")


def test_a_platform_jax_cannot_start_is_a_clear_error():
    # A process of its own (this one's backends are up); TPU: absent here and on the GPU machines.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "train", "--platform", "tpu", "--steps", "1"], capture_output=True,
                         text=True, env=env, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: platform='tpu': JAX cannot start that backend on this machine (")
    assert "--platform cpu" in out.stderr and "Traceback" not in out.stderr


def test_mesh_must_fit_the_devices():
    assert resolve_mesh("data=2,seq=4", 8) == {"data": 2, "seq": 4}
    assert resolve_mesh("seq=-1", 8) == {"seq": 8, "data": 1}
    assert list(parse_mesh("seq=4,data=2")) == ["seq", "data"]  # the given order is the mesh's order
    with pytest.raises(ValueError, match="needs 16 devices but 8 are available"):
        resolve_mesh("data=4,seq=4", 8)
    with pytest.raises(ValueError, match="not divisible by the fixed axes"):
        resolve_mesh("data=3,seq=-1", 8)
    assert resolve_mesh("data=1,seq=4", 8) == {"data": 1, "seq": 4}  # one process may use fewer devices
    with pytest.raises(ValueError, match="a multi-process mesh must use every device"):
        resolve_mesh("data=1,seq=4", 8, n_processes=2)


def test_seq_axis_must_divide_seq_len():
    cfg = TrainConfig(seq_len=100, batch_size=4)
    with pytest.raises(ValueError, match="seq_len 100 is not divisible by the seq axis size 8"):
        validate_shapes(cfg, {"data": 1, "seq": 8})
    with pytest.raises(ValueError, match="batch_size 4 is not divisible by the data axis size 8"):
        validate_shapes(dataclasses.replace(cfg, seq_len=128), {"data": 8, "seq": 1})


def test_cli_applies_flags_over_the_config_file(tmp_path):
    cfg, dist = cli.parse(["--mesh", "data=1,seq=8", "--lr", "3e-4", "--run-dir", str(tmp_path),
                           "--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "1"])
    assert cfg.model == presets.get("tnl-tiny") and cfg.mesh == "data=1,seq=8" and cfg.lr == 3e-4
    assert cfg.run_dir == str(tmp_path) and (dist.num_processes, dist.process_id) == (2, 1)
    assert cfg.steps == 1500  # from configs/tnl_tiny.py


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        cli.parse(["--config", str(tmp_path / "nope.py")])
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        cli.parse(["--config", str(bad)])


def test_main_reports_a_missing_data_file_as_an_error(capsys):
    assert _main(["--data", "/nonexistent/corpus.txt"], capsys) == (  # found when the run resolves its files
        2, "error: data: path '/nonexistent/corpus.txt' does not exist")


def test_run_configs_load_and_the_gpu_one_asks_for_data():
    cfg = cli.load_config_file(ROOT / "configs" / "train_tnl_1b.py")
    assert cfg.model == presets.get("tnl-1b").replace(remat="block_attention")
    assert (cfg.lr, cfg.warmup_steps, cfg.decay_steps) == (5e-4, 2000, 50_000)
    with pytest.raises(ValueError, match="no data given"):
        validate(cfg)
    validate(cli.load_config_file(cli.DEFAULT_CONFIG))
