"""EfficientQHandler and QuantizedCheckpointLoader on bare ignite engines and inside MONAI evaluators and trainers."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

torch.set_num_threads(1)

from ignite.engine import Engine, Events  # noqa: E402
from monai.data import DataLoader, Dataset  # noqa: E402
from monai.engines import SupervisedEvaluator, SupervisedTrainer  # noqa: E402
from monai.handlers import CheckpointLoader  # noqa: E402
from monai.losses import DiceLoss  # noqa: E402
from torch import nn  # noqa: E402

import monai_efficientq.handlers as handlers_mod  # noqa: E402
from nets import tiny_unet_bn  # noqa: E402
from monai_efficientq import EfficientQConfig, QuantizationReport, load_quantized, quantization_info, quantize_, quantize_network  # noqa: E402,E501
from monai_efficientq.handlers import EfficientQHandler, QuantizedCheckpointLoader, resolve_config  # noqa: E402
from monai_efficientq.modules import QuantizedMixin  # noqa: E402
from monai_efficientq.transforms import AttentionMapd, CalibrationCropd  # noqa: E402

FAST = {"iterations": 5, "progress": False}


def make_net(seed: int = 0) -> nn.Module:
    return tiny_unet_bn(seed, out_channels=2, num_res_units=1)


def make_volume(size: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, size, size, size, generator=gen)
    x[:, :3] = 0  # background outside the "body"
    return x


def make_label(size: int = 16) -> torch.Tensor:
    y = torch.zeros(1, size, size, size)
    y[:, 6:10, 6:10, 6:10] = 1
    return y


def n_quantized(net: nn.Module) -> int:
    return sum(isinstance(m, QuantizedMixin) for m in net.modules())


@torch.no_grad()
def out(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.eval()(x[None])


def bare_engine(net: nn.Module) -> Engine:
    engine = Engine(lambda e, b: None)
    engine.network = net
    return engine


def spy_quantize(monkeypatch) -> list:
    calls: list = []

    def spy(net, calib, config=None, label=None, attention_map=None, logger=None):
        calls.append(
            {"calib": calib, "config": config, "label": label, "attention_map": attention_map, "logger": logger}
        )
        return quantize_(net, calib, config=config, label=label, attention_map=attention_map, logger=logger)

    monkeypatch.setattr(handlers_mod, "quantize_", spy)
    return calls


def test_bare_engine_quantizes_network_in_place():
    net, x = make_net(), make_volume()
    reference, _ = quantize_network(net, x, EfficientQConfig(**FAST))
    handler = EfficientQHandler(calib_data=x, **FAST)
    engine = bare_engine(net)
    handler.attach(engine)
    assert engine.has_event_handler(handler, Events.EPOCH_STARTED)  # not a trainer -> EPOCH_STARTED
    assert not engine.has_event_handler(handler, Events.STARTED)
    engine.run([0], max_epochs=1)
    assert engine.network is net and n_quantized(net) > 0
    assert quantization_info(net).config["iterations"] == 5
    assert torch.equal(out(net, x), out(reference, x))
    assert engine.state.efficientq_report is handler.report
    assert len(handler.report.layers) == n_quantized(reference)


def test_engine_logger_is_passed(monkeypatch):
    calls = spy_quantize(monkeypatch)
    engine = bare_engine(make_net())
    EfficientQHandler(calib_data=make_volume(), **FAST).attach(engine)
    engine.run([0], max_epochs=1)
    assert calls[0]["logger"] is engine.logger


def _evaluator(net, tmp_path, handler, before=True):
    float_path = str(tmp_path / "float.pt")
    loader = CheckpointLoader(load_path=float_path, load_dict={"net": net}, map_location="cpu")
    data = DataLoader(Dataset([{"image": make_volume(), "label": make_label()}]), batch_size=1)
    val_handlers = [loader, handler] if before else [handler, loader]
    return SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=net, val_handlers=val_handlers)


def test_evaluator_quantizes_the_loaded_weights(tmp_path):
    trained = make_net(seed=0)
    torch.save(trained.state_dict(), tmp_path / "float.pt")
    x = make_volume()
    reference, _ = quantize_network(trained, x, EfficientQConfig(**FAST))
    fresh = make_net(seed=1)  # randomly re-initialised: only the CheckpointLoader brings the trained weights
    from_fresh, _ = quantize_network(fresh, x, EfficientQConfig(**FAST))
    assert not torch.allclose(out(reference, x), out(from_fresh, x))
    calib = Dataset([{"image": x, "label": make_label()}])
    handler = EfficientQHandler(calib_data=calib, **FAST)
    evaluator = _evaluator(fresh, tmp_path, handler)
    evaluator.run()
    assert n_quantized(fresh) > 0
    assert torch.equal(out(fresh, x), out(reference, x))
    assert evaluator.state.efficientq_report is handler.report


def test_handler_before_checkpoint_loader_quantizes_the_loaded_weights(tmp_path):
    """At EPOCH_STARTED the handler runs after every STARTED handler, whatever the order of the list."""
    trained, x = make_net(seed=0), make_volume()
    torch.save(trained.state_dict(), tmp_path / "float.pt")
    reference, _ = quantize_network(trained, x, EfficientQConfig(**FAST))
    fresh = make_net(seed=1)
    evaluator = _evaluator(fresh, tmp_path, EfficientQHandler(calib_data=x, **FAST), before=False)
    evaluator.run()
    assert n_quantized(fresh) > 0
    assert torch.equal(out(fresh, x), out(reference, x))


def test_runs_once_over_two_evaluator_runs(tmp_path, monkeypatch):
    calls = spy_quantize(monkeypatch)
    net, x = make_net(), make_volume()
    torch.save(net.state_dict(), tmp_path / "float.pt")
    handler = EfficientQHandler(calib_data=x, **FAST)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader(Dataset([{"image": x, "label": make_label()}])),
        network=net, val_handlers=[handler],
    )
    evaluator.run()
    first = out(net, x)
    first_report = handler.report
    evaluator.run()
    assert len(calls) == 1
    assert handler.report is first_report
    assert torch.equal(out(net, x), first)


class _Snapshot:
    """Records the network at STARTED, at the first iteration and (a copy of it) at COMPLETED."""

    def attach(self, engine):
        self.quantized_at = {}
        engine.add_event_handler(Events.STARTED, lambda e: self.quantized_at.update(started=n_quantized(e.network)))
        engine.add_event_handler(
            Events.ITERATION_COMPLETED, lambda e: self.quantized_at.update(iteration=n_quantized(e.network))
        )
        engine.add_event_handler(Events.COMPLETED, lambda e: setattr(self, "trained", copy.deepcopy(e.network)))


def test_trainer_quantizes_trained_network_at_completed():
    net, x = make_net(), make_volume()
    before = copy.deepcopy(net)
    data = DataLoader(Dataset([{"image": x, "label": make_label()}]), batch_size=1)
    snapshot = _Snapshot()
    handler = EfficientQHandler(calib_data=x, **FAST)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=2, train_data_loader=data, network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.5), loss_function=DiceLoss(to_onehot_y=True, softmax=True),
        train_handlers=[snapshot, handler],
    )
    assert trainer.has_event_handler(handler, Events.COMPLETED)
    assert not trainer.has_event_handler(handler, Events.STARTED)
    trainer.run()
    assert snapshot.quantized_at == {"started": 0, "iteration": 0}
    assert n_quantized(net) > 0
    trained = snapshot.trained
    assert not torch.allclose(out(trained, x), out(before, x))  # training changed the weights
    reference, _ = quantize_network(trained, x, EfficientQConfig(**FAST))
    assert torch.equal(out(net, x), out(reference, x))


def test_saves_checkpoint_report_and_dequantized(tmp_path):
    net, x = make_net(), make_volume()
    float_copy = copy.deepcopy(net)
    out_dir = tmp_path / "missing" / "dir"
    handler = EfficientQHandler(
        calib_data={"image": x}, weight_bits=2, save_path=out_dir / "q.pt", report_path=out_dir / "report.json",
        dequantized_path=out_dir / "deq.pt", **FAST,
    )
    engine = bare_engine(net)
    handler.attach(engine)
    assert not (tmp_path / "missing").exists()  # checked at attach, created only when the files are written
    engine.run([0], max_epochs=1)
    loaded = load_quantized(make_net(seed=3), out_dir / "q.pt")
    assert n_quantized(loaded) == n_quantized(net)
    assert torch.equal(out(loaded, x), out(net, x))
    report = QuantizationReport.from_json(out_dir / "report.json")
    assert len(report.layers) == len(handler.report.layers) and report.config["weight_bits"] == 2
    assert json.loads((out_dir / "report.json").read_text())["packed_bytes"] > 0
    assert "# EfficientQ quantization report" in (out_dir / "report.md").read_text()
    float_copy.load_state_dict(torch.load(out_dir / "deq.pt", weights_only=True))
    assert torch.allclose(out(float_copy, x), out(net, x), atol=1e-4)
    assert not [p for p in os.listdir(out_dir) if p.startswith(".tmp-")]


def test_unwritable_paths_fail_at_attach(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    engine = bare_engine(make_net())
    bad_parent = EfficientQHandler(calib_data=make_volume(), save_path=blocker / "q.pt", **FAST)
    with pytest.raises(ValueError, match="save_path.*is a file, not a folder"):
        bad_parent.attach(engine)
    a_dir = EfficientQHandler(calib_data=make_volume(), report_path=tmp_path, **FAST)
    with pytest.raises(ValueError, match="report_path.*is a folder"):
        a_dir.attach(engine)
    assert not engine.has_event_handler(bad_parent) and not engine.has_event_handler(a_dir)
    with pytest.raises(ValueError, match="the .json path"):
        EfficientQHandler(calib_data=make_volume(), report_path=tmp_path / "r.md")


def test_config_keywords_and_errors():
    x = make_volume()
    h = EfficientQHandler(x, config=EfficientQConfig(weight_bits=4), act_bits=3)
    assert (h.config.weight_bits, h.config.act_bits) == (4, 3)
    assert EfficientQHandler(x, {"weight_bits": 3}).config.weight_bits == 3
    # switching the preset re-derives its fields
    assert EfficientQHandler(x, preset="original").config.weight_scale == "tensor"
    assert EfficientQHandler(x, config=EfficientQConfig(), preset="original").config.weight_scale == "tensor"
    assert EfficientQHandler(x, preset="original", weight_scale="channel").config.weight_scale == "channel"
    with pytest.raises(ValueError, match=r"unknown EfficientQ config field.*'wieght_bits'.*valid fields.*weight_bits"):
        EfficientQHandler(x, wieght_bits=2)
    with pytest.raises(ValueError, match="weight_bits=9"):
        EfficientQHandler(x, weight_bits=9)
    with pytest.raises(ValueError, match="not an ignite event"):
        EfficientQHandler(x, event="NOPE").attach(bare_engine(make_net()))


def test_explicit_event_name():
    engine = bare_engine(make_net())
    handler = EfficientQHandler(make_volume(), event="completed", **FAST)
    handler.attach(engine)
    assert engine.has_event_handler(handler, Events.COMPLETED)
    assert not engine.has_event_handler(handler, Events.STARTED)


def test_dict_items_label_attention_and_dict_preprocess(monkeypatch):
    calls = spy_quantize(monkeypatch)
    x, y = make_volume(20), make_label(20)
    item = AttentionMapd(keys="label", image_key="image", num_classes=2)({"image": x, "label": y})
    pre = CalibrationCropd(keys=["image", "label", "attention"], roi_size=12, divisible_by=16)
    handler = EfficientQHandler(
        calib_data=[item], label_key="label", attention_key="attention", preprocess=pre, attention="label", **FAST
    )
    engine = bare_engine(make_net())
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    (call,) = calls
    assert tuple(call["calib"].shape) == (1, 16, 16, 16)  # cropped by the dict preprocess
    assert tuple(call["label"].shape) == (1, 16, 16, 16) and tuple(call["attention_map"].shape) == (1, 16, 16, 16)
    expected = pre(item)
    assert torch.equal(call["attention_map"], expected["attention"])
    assert float(call["attention_map"].max()) > 1.0  # the rare class is up-weighted


def test_misaligned_label_is_an_error():
    x = make_volume(16)
    handler = EfficientQHandler(
        calib_data={"image": x, "label": make_label(20)}, label_key="label", attention="label", **FAST
    )
    engine = bare_engine(make_net())
    handler.attach(engine)
    with pytest.raises(ValueError, match="spatial shapes must match"):
        engine.run([0], max_epochs=1)


def test_dataloader_first_batch_and_array_preprocess(monkeypatch):
    calls = spy_quantize(monkeypatch)
    data = [{"image": make_volume(seed=i)} for i in range(3)]
    loader = DataLoader(Dataset(data), batch_size=2)
    handler = EfficientQHandler(calib_data=loader, preprocess=lambda t: t * 2, **FAST)
    engine = bare_engine(make_net())
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    calib = calls[0]["calib"]
    assert tuple(calib.shape) == (2, 1, 16, 16, 16)
    assert torch.equal(torch.as_tensor(calib[1]), make_volume(seed=1) * 2)


def test_network_argument_for_engines_without_network():
    net, x = make_net(), make_volume()
    engine = Engine(lambda e, b: None)
    EfficientQHandler(x, **FAST).attach(engine)
    with pytest.raises(ValueError, match="no `network`"):
        engine.run([0], max_epochs=1)
    engine = Engine(lambda e, b: None)
    EfficientQHandler(x, network=net, **FAST).attach(engine)
    engine.run([0], max_epochs=1)
    assert n_quantized(net) > 0


def test_several_calibration_volumes_from_a_dataset_and_a_dataloader(monkeypatch):
    calls = spy_quantize(monkeypatch)
    volumes = [make_volume(20, seed=i) for i in range(3)]
    pre = CalibrationCropd(keys="image", roi_size=12, divisible_by=16)
    handler = EfficientQHandler(
        calib_data=Dataset([{"image": v} for v in volumes]), preprocess=pre, calib_volumes=2, **FAST
    )
    engine = bare_engine(make_net())
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    calib = calls[0]["calib"]
    assert tuple(calib.shape) == (2, 1, 16, 16, 16)  # the first two items, each cropped, as one batch
    for i in range(2):
        assert torch.equal(calib[i], torch.as_tensor(pre({"image": volumes[i]})["image"]))
    assert handler.report.calibration_shape == [2, 1, 16, 16, 16]
    loader = DataLoader(Dataset([{"image": v} for v in volumes]), batch_size=2)
    EfficientQHandler(calib_data=loader, calib_volumes=2, **FAST).attach(engine := bare_engine(make_net()))
    engine.run([0], max_epochs=1)
    assert tuple(calls[1]["calib"].shape) == (3, 1, 20, 20, 20)  # two batches: 2 + 1 volumes
    with pytest.raises(ValueError, match="calib_volumes"):
        EfficientQHandler(calib_data=loader, calib_volumes=0)
    sizes = Dataset([{"image": make_volume(16)}, {"image": make_volume(20)}])
    handler = EfficientQHandler(calib_data=sizes, calib_volumes=2, **FAST)
    handler.attach(engine := bare_engine(make_net()))
    with pytest.raises(ValueError, match="different spatial shapes"):
        engine.run([0], max_epochs=1)


def test_none_words_mean_none():
    x = make_volume()
    assert EfficientQHandler(x, act_bits="none", patience="NULL").config.act_bits is None
    assert EfficientQHandler(x, config={"act_bits": "None", "first_last_bits": "null"}).config.first_last_bits is None
    assert resolve_config(None, act_bits="none").act_bits is None
    assert resolve_config(None, act_bits=3).act_bits == 3
    assert resolve_config(None, attention="none").attention == "none"  # a value of its own, not None
    with pytest.raises(ValueError, match="act_bits='nothing' is not supported"):
        resolve_config(None, act_bits="nothing")


def test_quantized_checkpoint_loader_restores_packed_and_float_weights(tmp_path):
    net, x = make_net(), make_volume()
    handler = EfficientQHandler(calib_data=x, save_path=tmp_path / "q.pt", **FAST)
    engine = bare_engine(net)
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    torch.save(make_net(seed=0).state_dict(), tmp_path / "float.pt")

    fresh = make_net(seed=2)
    loader = QuantizedCheckpointLoader(load_path=tmp_path / "q.pt")
    engine = bare_engine(nn.DataParallel(fresh))  # unwrapped before loading
    loader.attach(engine)
    assert engine.has_event_handler(loader, Events.STARTED)
    engine.run([0], max_epochs=1)
    assert n_quantized(fresh) == n_quantized(net)
    assert torch.equal(out(fresh, x), out(net, x))

    float_net = make_net(seed=2)
    engine = Engine(lambda e, b: None)
    QuantizedCheckpointLoader(load_path=tmp_path / "float.pt", network=float_net).attach(engine)
    engine.run([0], max_epochs=1)
    assert n_quantized(float_net) == 0
    assert torch.equal(out(float_net, x), out(make_net(seed=0), x))
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        QuantizedCheckpointLoader(load_path=tmp_path / "missing.pt")(bare_engine(make_net()))
