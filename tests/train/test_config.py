"""Config overrides, the command line and up-front validation: each bad config gets its own clear error."""

from __future__ import annotations

import dataclasses

import pytest

from train import cli
from train.config import TrainConfig, apply_overrides, parse_mesh, resolve_mesh, validate, validate_shapes


def test_overrides_parse_each_field_type():
    cfg = apply_overrides(TrainConfig(), ["lr=3e-4", "steps=1_000", "resume=false", "data=a.txt,b.jsonl",
                                          "mesh=data=1,seq=8"])
    assert cfg.lr == 3e-4 and cfg.steps == 1000 and cfg.resume is False
    assert cfg.data == ("a.txt", "b.jsonl") and cfg.mesh == "data=1,seq=8"


def test_model_overrides_are_typed_by_model_config():
    types = cli.model_field_types()
    cfg = apply_overrides(TrainConfig(), ["model.d_model=64", "model.softmax_layers=1,3", "model.remat=block"],
                          types)
    assert cfg.model_overrides == {"d_model": 64, "softmax_layers": (1, 3), "remat": "block"}
    with pytest.raises(ValueError, match="remat: expected one of"):
        apply_overrides(TrainConfig(), ["model.remat=sometimes"], types)
    with pytest.raises(ValueError, match="unknown model field 'd_modle'; did you mean 'd_model'"):
        apply_overrides(TrainConfig(), ["model.d_modle=64"], types)


@pytest.mark.parametrize("override, message", [
    ("lrr=1", "unknown config field 'lrr'; did you mean 'lr'"),
    ("lr=fast", "lr: expected a number"),
    ("steps=1.5", "steps: expected an integer"),
    ("resume=maybe", "resume: expected a boolean"),
    ("lr", "expects name=value"),
])
def test_bad_override(override, message):
    with pytest.raises(ValueError, match=message):
        apply_overrides(TrainConfig(), [override])


@pytest.mark.parametrize("changes, message", [
    ({"steps": 0}, "steps must be positive"),
    ({"warmup_steps": 100, "decay_steps": 10}, r"decay_steps \(10\) must be >= warmup_steps \(100\)"),
    ({"b2": 1.0}, r"b2 must be in \[0, 1\)"),
    ({"val_fraction": 0.0}, "val_fraction must be in"),
    ({"bin_dtype": "int8"}, "bin_dtype must be uint16 or uint32"),
    ({"tokenizer": "/nonexistent/tokenizer.json"}, "neither 'byte' nor an existing tokenizer"),
    ({"data": ()}, "no data given"),
    ({"mesh": "data=2,model=4"}, "unknown axis 'model'"),
    ({"mesh": "data=2,seq=x"}, "size of 'seq' must be an integer"),
    ({"compute_dtype": "int8"}, "compute_dtype must be"),
])
def test_validate_names_the_bad_field(changes, message):
    with pytest.raises(ValueError, match=message):
        validate(dataclasses.replace(TrainConfig(), **changes))


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
    cfg = dataclasses.replace(TrainConfig(), seq_len=100, batch_size=4)
    with pytest.raises(ValueError, match="seq_len 100 is not divisible by the seq axis size 8"):
        validate_shapes(cfg, {"data": 1, "seq": 8})
    with pytest.raises(ValueError, match="batch_size 4 is not divisible by the data axis size 8"):
        validate_shapes(dataclasses.replace(cfg, seq_len=128), {"data": 8, "seq": 1})


def test_cli_applies_flags_over_the_config_file(tmp_path):
    cfg, dist = cli.parse(["--mesh", "data=1,seq=8", "--set", "lr=3e-4", "--run-dir", str(tmp_path),
                           "--coordinator", "localhost:1234", "--num-processes", "2", "--process-id", "1"])
    assert cfg.model == "tnl-tiny" and cfg.mesh == "data=1,seq=8" and cfg.lr == 3e-4
    assert cfg.run_dir == str(tmp_path) and (dist.num_processes, dist.process_id) == (2, 1)


def test_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        cli.parse(["--config", str(tmp_path / "nope.py")])
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        cli.parse(["--config", str(bad)])


def test_main_reports_a_bad_config_as_an_error(capsys):
    from train.__main__ import main

    assert main(["--set", "seq_len=-3"]) == 2
    assert "seq_len must be positive" in capsys.readouterr().err
    assert main(["--set", "data=/nonexistent/corpus.txt"]) == 2  # found when the run resolves its files
    assert "path '/nonexistent/corpus.txt' does not exist" in capsys.readouterr().err


def test_run_configs_load_and_the_gpu_one_asks_for_data():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cfg = cli.load_config_file(root / "configs" / "train_tnl_1b.py")
    assert (cfg.model, cfg.lr, cfg.warmup_steps, cfg.decay_steps) == ("tnl-1b", 5e-4, 2000, 50_000)
    with pytest.raises(ValueError, match="no data given"):
        validate(cfg)
    validate(cli.load_config_file(cli.DEFAULT_CONFIG))
