from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_efficientq import load_quantized
from monai_efficientq.cli import quantize, report

from conftest import SEGRESNET_CLASS, SEGRESNET_KWARGS
from nets import tiny_segresnet

NET, KWARGS = SEGRESNET_CLASS, SEGRESNET_KWARGS


def test_quantize_writes_checkpoint_and_report(files, capsys):
    net, ckpt, img, tmp = files
    out = tmp / "out" / "q.pt"
    quantize(str(ckpt), str(img), network=NET, network_kwargs=KWARGS, output=str(out), roi_size=16,
             weight_bits=3, act_bits=4, iterations=3, quiet=True, dequantized=str(tmp / "out" / "deq.pt"))
    float_copy = tiny_segresnet(seed=1)
    float_copy.load_state_dict(torch.load(tmp / "out" / "deq.pt"))  # the original definition loads the export
    assert out.exists() and (tmp / "out" / "q.json").exists() and (tmp / "out" / "q.md").exists()
    rep = json.loads((tmp / "out" / "q.json").read_text())
    assert rep["calibration_shape"] == [1, 1, 16, 16, 16]
    assert rep["config"]["weight_bits"] == 3
    qnet = load_quantized(tiny_segresnet(seed=1), out)
    assert sum(hasattr(m, "weight_codes") for m in qnet.modules()) == len(rep["layers"])
    assert "EfficientQ quantization report" in report(str(out))
    assert "| 0 |" in report(str(tmp / "out" / "q.json"))


def test_wrong_channels_in_nifti(files):
    net, ckpt, img, tmp = files
    vol = np.random.default_rng(0).random((16, 16, 16, 2)).astype(np.float32)
    two = tmp / "two.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), two)
    with pytest.raises(ValueError, match="2 channel.*expects 1"):
        quantize(str(ckpt), str(two), network=NET, network_kwargs=KWARGS, output=str(tmp / "q.pt"), quiet=True)
    assert not (tmp / "q.pt").exists()


def test_command_line_errors_are_clean(files):
    net, ckpt, img, tmp = files
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    base = [sys.executable, "-m", "monai_efficientq.cli", "quantize", "--checkpoint", str(ckpt),
            "--network", NET, "--network_kwargs", KWARGS, "--output", str(tmp / "q.pt")]
    bad_bits = subprocess.run(base + ["--calib", str(img), "--weight_bits", "9"], capture_output=True, text=True, env=env)
    assert bad_bits.returncode == 2
    assert "weight_bits=9 is not supported" in bad_bits.stderr and "Traceback" not in bad_bits.stderr
    missing = subprocess.run(base + ["--calib", str(tmp / "nope.nii.gz")], capture_output=True, text=True, env=env)
    assert missing.returncode == 2 and "calibration volume not found" in missing.stderr
    assert not (tmp / "q.pt").exists()
    helptext = subprocess.run([sys.executable, "-m", "monai_efficientq.cli", "quantize", "--help"],
                              capture_output=True, text=True, env={**env, "PAGER": "cat"})
    for flag in ("--weight_bits", "--act_bits", "--roi_size", "--preset", "--device", "--config_file"):
        assert flag in helptext.stdout + helptext.stderr


def _main_error(argv, capsys) -> str:
    from monai_efficientq.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


@pytest.mark.parametrize(
    "output, match",
    [("adir", "is a folder: give a file path in it"), ("afile/x/q.pt", "is a file, not a folder")],
)
def test_bad_outputs_are_refused_before_any_work(files, capsys, monkeypatch, output, match):
    import monai_efficientq.io as io_mod

    net, ckpt, img, tmp = files
    monkeypatch.chdir(tmp)
    (tmp / "adir").mkdir()
    (tmp / "afile").write_text("x")
    monkeypatch.setattr(io_mod, "load_float_weights", lambda *a: pytest.fail("work started before the check"))
    err = _main_error(["quantize", "--checkpoint", str(ckpt), "--calib", str(img), "--network", NET,
                       "--network_kwargs", KWARGS, "--output", output], capsys)
    assert match in err


def test_a_failed_run_leaves_no_folder_and_debug_shows_the_traceback(files, capsys):
    from monai_efficientq.cli import main

    net, ckpt, img, tmp = files
    argv = ["quantize", "--checkpoint", str(ckpt), "--calib", str(tmp / "nope.nii.gz"), "--network", NET,
            "--network_kwargs", KWARGS, "--output", str(tmp / "new" / "sub" / "q.pt")]
    assert "calibration volume not found" in _main_error(argv, capsys)
    assert not (tmp / "new").exists()
    with pytest.raises(FileNotFoundError):
        main(argv + ["--debug"])
    assert "no network given: pass --network" in _main_error(["quantize", "--checkpoint", str(ckpt), "--calib",
                                                              str(img)], capsys)
    assert "--num_threads=0" in _main_error(argv[:-2] + ["--output", str(tmp / "q.pt"), "--num_threads", "0"], capsys)


def test_garbage_checkpoint_and_calibration_messages(files):
    from monai_efficientq.io import load_calibration, load_float_weights

    net, ckpt, img, tmp = files
    (tmp / "garbage.pt").write_bytes(b"\x80\x04 not a pickle at all")
    with pytest.raises(ValueError, match="not a readable float checkpoint") as info:
        load_float_weights(tiny_segresnet(), str(tmp / "garbage.pt"))
    assert "weights_only=False" not in str(info.value)
    (tmp / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="cannot read .*notes.txt as an image"):
        load_calibration(str(tmp / "notes.txt"))


def test_report_into_a_closed_pipe_is_quiet(files):
    net, ckpt, img, tmp = files
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = tmp / "q.pt"
    quantize(str(ckpt), str(img), network=NET, network_kwargs=KWARGS, output=str(out), roi_size=16,
             iterations=2, quiet=True)
    proc = subprocess.Popen([sys.executable, "-m", "monai_efficientq.cli", "report", str(tmp / "q.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the report is printed, as with `| head` on a long report
    stderr = proc.stderr.read().decode()
    assert proc.wait() == 0 and stderr == ""


def test_ctrl_c_exits_130_and_writes_nothing(files, capsys, monkeypatch):
    import monai_efficientq.cli as cli_mod

    net, ckpt, img, tmp = files

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod, "quantize_", interrupted)
    with pytest.raises(SystemExit) as info:
        cli_mod.main(["quantize", "--checkpoint", str(ckpt), "--calib", str(img), "--network", NET,
                      "--network_kwargs", KWARGS, "--output", str(tmp / "ctrl_c" / "q.pt"), "--roi_size", "16"])
    assert info.value.code == 130
    assert "interrupted" in capsys.readouterr().err
    assert not (tmp / "ctrl_c").exists()
