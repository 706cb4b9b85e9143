import json

import pytest

from radsynth.configs import RadsynthConfig, UserInputError, config_to_yaml, load_config, validate_config
from radsynth.flows.cli import main

from .conftest import REPO

PRESETS = sorted(path.stem for path in (REPO / "configs").glob("*.yaml"))  # a new preset cannot be left out


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_validates_and_round_trips_through_yaml(name, tmp_path):
    config = load_config(REPO / "configs" / f"{name}.yaml")
    config.check_trainable()  # a preset whose grid the networks cannot halve would fail only at `radsynth train`
    assert set(RadsynthConfig.model_fields) == {
        "data", "autoencoder", "diffusion", "conditioning", "controlnet", "mask_generator", "finetune", "distill", "sampling",
        "translation", "scoring", "release", "runtime"}
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(config_to_yaml(config))
    assert load_config(dumped) == config


def test_preset_name_resolves_to_the_shipped_file():
    assert load_config("demo") == load_config(REPO / "configs" / "demo.yaml")


def test_overrides_are_parsed_as_yaml_values_at_any_depth():
    config = load_config("demo", ["runtime.seed=7", "data.preprocess.target_shape=[32, 32]",
                                  "data.split.stratify_by=null", "sampling.prompts=[a, b]",
                                  "finetune.from=runs/demo/model", "finetune.filter={finding: pneumothorax}"])
    assert config.runtime.seed == 7
    assert config.data.preprocess.target_shape == [32, 32]
    assert config.data.split.stratify_by is None
    assert config.sampling.prompts == ["a", "b"]
    assert config.finetune.from_ == "runs/demo/model" and config.finetune.filter == {"finding": "pneumothorax"}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("data.colour=red", "unknown key 'data.colour'; allowed here: name, format"),
        ("runtime.precission=bf16", "unknown key 'runtime.precission'"),
        ("data.format=nifti",
         "data.format: Input should be 'phantom', 'msd', 'image_folder', 'dicom' or 'sources' (got 'nifti')"),
        ("runtime.precision=fp8", "runtime.precision: Input should be 'no', 'bf16', 'fp16' or 'auto' (got 'fp8')"),
        ("data.split.train=0.9", "train + holdout + test must sum to 1"),
        ("data.phantom.n_cases=-4", "data.phantom.n_cases: Input should be greater than or equal to 3 (got -4)"),
        ("data.phantom.shape=[16,64,64]", "data.phantom.shape.0: Input should be greater than or equal to 24 (got 16)"),
        ("conditioning.embed_dim=10", "embed_dim (10) must be divisible by text_heads (4)"),
        ("runtime.seed", "override 'runtime.seed' is not key=value"),
        ("runtime.device.cuda=1", "'runtime.device' is a value, not a section"),
    ],
)
def test_bad_config_values_and_keys_name_the_path_and_what_is_allowed(override, expected):
    with pytest.raises(UserInputError) as caught:
        load_config("demo", [override])
    assert expected in str(caught.value)
    assert "demo.yaml" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_section_and_broken_yaml_are_user_errors(tmp_path):
    with pytest.raises(UserInputError, match="missing required key 'data'"):
        validate_config({"runtime": {}}, "x.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(UserInputError, match="not valid YAML at line"):
        load_config(broken)
    with pytest.raises(UserInputError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_config_show_json_prints_the_resolved_config_as_its_last_line(capsys):
    assert main(["config", "show", "demo", "runtime.seed=11", "--json"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["runtime"]["seed"] == 11


def test_cli_exits_2_with_one_line_on_a_config_error(capsys):
    assert main(["config", "show", "demo", "data.nope=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("radsynth: error:") and "data.nope" in err
