"""EfficientQWorkflow: unknown overrides refused before anything runs, one-line errors, exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from monai.bundle import ConfigParser

from monai_efficientq.workflow import (
    EfficientQWorkflow,
    UnknownOverrideError,
    check_override_ids,
    one_line,
    unwrap_config_error,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLE = os.path.join(REPO, "bundles", "brain_tissue_mri_segmentation")
QUANTIZE = [os.path.join(BUNDLE, "configs", name) for name in ("common.json", "evaluate.json", "quantize.json")]

CONFIG = {
    "imports": ["$import os"],
    "weight_bits": 2,
    "act_bits": 2,
    "network_def": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 3},
    "validate": {"dataloader": {"batch_size": 1}},
    "marker_path": "",
    "run": ["$open(@marker_path, 'w').write('ran')"],
    "fail": ["$int('not a number')"],
}


@pytest.fixture
def config_file(tmp_path) -> str:
    path = tmp_path / "configs" / "run.json"
    path.parent.mkdir()
    path.write_text(json.dumps(CONFIG))
    return str(path)


def _parser() -> ConfigParser:
    return ConfigParser(dict(CONFIG))


@pytest.mark.parametrize("override", ["weight_bits", "validate#dataloader#batch_size", "network_def#padding"])
def test_known_ids_and_new_component_arguments_pass(override):
    check_override_ids(_parser(), {override: 1})


@pytest.mark.parametrize(
    "override, nearest, valid",
    [
        ("weight_bit", "--weight_bits", "act_bits, fail, marker_path, network_def, run, validate, weight_bits"),
        ("validate#dataloadr#batch_size", "--validate#dataloader", "dataloader"),
        ("zzz", None, "act_bits, fail, marker_path, network_def, run, validate, weight_bits"),
        ("validate#dataloader#batch", "--validate#dataloader#batch_size", "batch_size"),  # a plain dict: no new keys
    ],
)
def test_unknown_ids_refused_with_nearest_and_valid_ids(override, nearest, valid):
    with pytest.raises(UnknownOverrideError) as info:
        check_override_ids(_parser(), {override: 1})
    message = str(info.value)
    assert f"unknown override --{override}" in message
    assert (f"Did you mean {nearest}?" in message) if nearest else ("Did you mean" not in message)
    assert message.endswith(f"{valid}.")


def test_typo_refused_before_anything_runs(config_file, tmp_path, capsys):
    marker = tmp_path / "ran.txt"
    with pytest.raises(SystemExit) as info:
        EfficientQWorkflow(config_file=config_file, logging_file=False, marker_path=str(marker), weight_bit=3)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown override --weight_bit" in err[0] and "--weight_bits?" in err[0]
    assert not marker.exists()


def test_valid_overrides_run(config_file, tmp_path):
    marker = tmp_path / "ran.txt"
    workflow = EfficientQWorkflow(config_file=config_file, logging_file=False, marker_path=str(marker), weight_bits=3)
    workflow.initialize()
    workflow.run()
    assert marker.read_text() == "ran" and workflow.parser["weight_bits"] == 3


def test_error_in_run_is_one_line_exit_2_and_debug_raises(config_file, capsys):
    workflow = EfficientQWorkflow(config_file=config_file, logging_file=False, run_id="fail")
    workflow.initialize()
    with pytest.raises(SystemExit) as info:
        workflow.run()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "monai-efficientq: error: invalid literal for int() with base 10: 'not a number' "
        "(add --debug True for the traceback)"
    ]
    debug = EfficientQWorkflow(config_file=config_file, logging_file=False, run_id="fail", debug=True)
    debug.initialize()
    with pytest.raises(RuntimeError, match="Failed to evaluate") as raised:
        debug.run()
    assert isinstance(unwrap_config_error(raised.value), ValueError)


def test_unwrap_keeps_our_own_wrapping_errors():
    try:
        try:
            raise ValueError("shape mismatch")
        except ValueError as inner:
            raise RuntimeError("the float network failed on the calibration volume: shape mismatch") from inner
    except RuntimeError as ours:
        assert unwrap_config_error(ours) is ours
    assert one_line(KeyError("no such key")) == "no such key"
    assert one_line(ZeroDivisionError("x\n  y")) == "ZeroDivisionError: x y"


def test_bundle_typo_from_the_command_line_is_one_line(tmp_path):
    """The bundle's own quantize run, as a user types it: refused in seconds, nothing written."""
    out = tmp_path / "out"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "quantize",
        "--workflow_name", "monai_efficientq.workflow.EfficientQWorkflow",
        "--config_file", str(QUANTIZE), "--bundle_root", BUNDLE, "--output_dir", str(out), "--weight_bit", "3",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("monai-efficientq: error")]
    assert len(errors) == 1 and "--weight_bit:" in errors[0] and "Did you mean --weight_bits?" in errors[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert not out.exists()
