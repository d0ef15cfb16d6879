"""The evaluation stage: cost, accuracy, agreement and latency of one model or two."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import ROOT, residual_model
from onnx import numpy_helper
from rich.console import Console

from onnxprune.errors import InputError, UsageError
from onnxprune.evaluate import EvalOptions, evaluate, print_eval

FMNIST = ROOT / "models" / "resnet_fmnist.onnx"
FMNIST_DATA = ROOT / "models" / "fashion_mnist_val.npz"
FAST = dict(repeat=3, warmup=1)


def save(model: onnx.ModelProto, path: Path, **kwargs) -> Path:
    onnx.save(model, str(path), **kwargs)
    return path


def with_classes(model: onnx.ModelProto, classes: int) -> onnx.ModelProto:
    """The residual model with a `classes`-way head."""
    rng = np.random.default_rng(7)
    inits = model.graph.initializer
    for k, init in enumerate(inits):
        if init.name == "fc_w":
            w = rng.standard_normal((classes, numpy_helper.to_array(init).shape[1]))
            inits[k].CopyFrom(numpy_helper.from_array(w.astype(np.float32), "fc_w"))
        elif init.name == "fc_b":
            inits[k].CopyFrom(numpy_helper.from_array(np.zeros(classes, np.float32), "fc_b"))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = classes
    return model


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.astype(np.float32)})[0]


def check_latency(report: dict, n: int) -> None:
    lat = report["latency"]
    assert lat["threads"] == 1 and lat["batch"] >= 1 and lat["repeat"] == FAST["repeat"]
    assert len(lat["models"]) == n
    for m in lat["models"]:
        assert m["p50_ms"] > 0 and m["p90_ms"] >= m["p50_ms"]
    if n == 2:
        assert lat["ratio"] > 0
    else:
        assert "ratio" not in lat


def test_one_model_random_inputs_report_keys_and_json(residual_path):
    report = evaluate(residual_path, options=EvalOptions(**FAST))
    assert json.loads(json.dumps(report)) == report
    assert set(report) == {"models", "latency", "inputs", "samples"}  # no labels, no second model
    (m,) = report["models"]
    assert m["path"] == str(residual_path)
    assert isinstance(m["params"], int) and isinstance(m["macs"], int)
    # conv1 3·3·3·16 + 16, conv2 16·16·9 + 16, conv3 16·16, fc 16·10 + 10
    assert m["params"] == 432 + 16 + 2304 + 16 + 256 + 160 + 10
    assert m["macs"] > 0
    assert report["inputs"] == "random" and report["samples"] == 1
    check_latency(report, 1)


def test_embedded_model_accuracy_matches_onnxruntime_and_self_agreement():
    steps = []

    def progress(label: str, total: int):
        steps.append((label, total, []))
        return lambda: steps[-1][2].append(1)

    report = evaluate(FMNIST, FMNIST, EvalOptions(data=str(FMNIST_DATA), **FAST),
                      progress=progress)
    assert json.loads(json.dumps(report)) == report
    with np.load(FMNIST_DATA) as data:
        x, y = data["x"], data["y"]
    logits = ort_logits(FMNIST, x)
    top1 = float((logits.argmax(1) == y).mean())
    top5 = float((np.argsort(-logits, 1)[:, :5] == y[:, None]).any(1).mean())
    assert len(report["accuracy"]) == 2
    for acc in report["accuracy"]:
        assert acc["top1"] == pytest.approx(top1)
        assert acc["top5"] == pytest.approx(top5)
        assert 0.5 < acc["top1"] <= acc["top5"] <= 1
    assert report["agreement"]["top1"] == 1.0
    assert report["agreement"]["max_abs"] == 0 and report["agreement"]["mean_abs"] == 0
    assert report["inputs"] == "data" and report["samples"] == len(x)
    assert report["models"][0] == {**report["models"][1]}
    assert report["models"][0]["params"] > 0 and report["models"][0]["macs"] > 0
    check_latency(report, 2)
    assert [(label, total, len(done)) for label, total, done in steps] == \
        [("measuring latency", 3, 3)]


def test_agreement_with_different_weights_on_random_inputs(residual_path, tmp_path):
    other = save(residual_model(seed=1), tmp_path / "other.onnx")
    report = evaluate(residual_path, other, EvalOptions(**FAST))
    agree = report["agreement"]
    assert agree["top1"] < 1 and agree["max_abs"] > 0 and agree["mean_abs"] > 0
    assert report["inputs"] == "random" and report["samples"] == 8
    assert "accuracy" not in report
    assert report["models"][0]["params"] == report["models"][1]["params"]
    check_latency(report, 2)


def test_accuracy_on_synthetic_labels_and_float64_data(residual_path, tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((37, 3, 8, 8))  # float64, an odd count of rows
    y = rng.integers(0, 10, 37)
    data = tmp_path / "val.npz"
    np.savez(data, x=x, y=y)
    report = evaluate(residual_path, options=EvalOptions(data=str(data), eval_batch=8, batch=4,
                                                         **FAST))
    logits = ort_logits(residual_path, x)
    (acc,) = report["accuracy"]
    assert acc["top1"] == pytest.approx(float((logits.argmax(1) == y).mean()))
    assert acc["top5"] == pytest.approx(
        float((np.argsort(-logits, 1)[:, :5] == y[:, None]).any(1).mean()))
    assert acc["top5"] >= acc["top1"]
    assert report["latency"]["batch"] == 4
    assert report["inputs"] == "data" and report["samples"] == 37


def test_top5_is_null_below_five_classes(tmp_path):
    path = save(with_classes(residual_model(), 3), tmp_path / "three.onnx")
    data = tmp_path / "val.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((10, 3, 8, 8)).astype(np.float32),
             y=rng.integers(0, 3, 10))
    (acc,) = evaluate(path, options=EvalOptions(data=str(data), **FAST))["accuracy"]
    assert acc["top5"] is None and 0 <= acc["top1"] <= 1


def test_fixed_batch_model_runs_in_its_own_batch(tmp_path):
    model = residual_model()
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = 4
    path = save(model, tmp_path / "fixed.onnx")
    rng = np.random.default_rng(1)
    x = rng.standard_normal((10, 3, 8, 8)).astype(np.float32)  # not a multiple of 4
    y = rng.integers(0, 10, 10)
    data = tmp_path / "val.npz"
    np.savez(data, x=x, y=y)
    report = evaluate(path, options=EvalOptions(data=str(data), **FAST))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    padded = np.concatenate([x, x[:2]])
    logits = np.concatenate([sess.run(None, {"x": padded[i:i + 4]})[0] for i in (0, 4, 8)])[:10]
    assert report["accuracy"][0]["top1"] == pytest.approx(float((logits.argmax(1) == y).mean()))
    assert report["latency"]["batch"] == 4


def test_external_data_model(tmp_path, residual_path):
    folder = tmp_path / "ext"
    folder.mkdir()
    path = save(residual_model(), folder / "model.onnx", save_as_external_data=True,
                all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    assert (folder / "model.onnx.data").exists()
    report = evaluate(path, residual_path, EvalOptions(**FAST))
    assert report["models"][0]["params"] == report["models"][1]["params"]
    assert report["agreement"]["max_abs"] == 0 and report["agreement"]["top1"] == 1.0


def test_print_eval_table(residual_path, tmp_path):
    other = save(residual_model(seed=1), tmp_path / "other.onnx")
    report = evaluate(residual_path, other, EvalOptions(**FAST))
    buffer = io.StringIO()
    print_eval(Console(file=buffer, width=200, highlight=False), report)
    text = buffer.getvalue()
    assert "residual.onnx" in text and "other.onnx" in text
    assert "p50" in text and "top-1" in text
    assert "output agreement on 8 random inputs" in text
    assert "latency ratio" in text


@pytest.mark.parametrize("case", ["missing", "corrupt", "missing-external"])
def test_bad_model_file_is_input_error(case, tmp_path, residual_path):
    if case == "missing":
        path = tmp_path / "nope.onnx"
    elif case == "corrupt":
        path = tmp_path / "bad.onnx"
        path.write_bytes(residual_path.read_bytes()[:100])
    else:
        path = save(residual_model(), tmp_path / "model.onnx", save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
        (tmp_path / "model.onnx.data").unlink()
    with pytest.raises(InputError):
        evaluate(path, options=EvalOptions(**FAST))
    with pytest.raises(InputError):  # as the second model too
        evaluate(residual_path, path, options=EvalOptions(**FAST))


def test_bad_data_is_input_error(residual_path, tmp_path):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((4, 1, 28, 28), np.float32))
    with pytest.raises(InputError, match="shape"):
        evaluate(residual_path, options=EvalOptions(data=str(wrong), **FAST))
    with pytest.raises(InputError):
        evaluate(residual_path, options=EvalOptions(data=str(tmp_path / "none.npz"), **FAST))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(InputError):
        evaluate(residual_path, options=EvalOptions(data=str(garbage), **FAST))
    labels = tmp_path / "labels.npz"
    np.savez(labels, x=np.zeros((4, 3, 8, 8), np.float32), y=np.array([0, 1, 2, 10]))
    with pytest.raises(InputError, match="classes"):
        evaluate(residual_path, options=EvalOptions(data=str(labels), **FAST))
    # The data must fit the second model too.
    with pytest.raises(InputError, match="shape"):
        evaluate(FMNIST, residual_path, EvalOptions(data=str(FMNIST_DATA), **FAST))


def test_incompatible_second_model_is_input_error(residual_path, tmp_path):
    with pytest.raises(InputError, match="cannot be compared"):
        evaluate(residual_path, FMNIST, EvalOptions(**FAST))  # other input name and shape
    three = save(with_classes(residual_model(), 3), tmp_path / "three.onnx")
    with pytest.raises(InputError, match="first output"):
        evaluate(residual_path, three, EvalOptions(**FAST))


@pytest.mark.parametrize("field", ["threads", "batch", "repeat", "eval_batch"])
def test_bad_options_are_usage_errors(field, residual_path):
    with pytest.raises(UsageError):
        evaluate(residual_path, options=EvalOptions(**{field: 0}))
