"""The CLI: the happy path, the plan round trip, and every bad input (§10)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxprune.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxprune: error:"), err
    assert needle in lines[0], err
    assert "Traceback" not in err


def test_prune_writes_model_plan_and_json_report(residual_path, tmp_path, capsys):
    before = digest(residual_path)
    out, plan = tmp_path / "out.onnx", tmp_path / "plan.json"
    code, stdout, _ = run_cli(capsys, residual_path, "--method", "fpgm", "--ratio", "0.5",
                              "--round-to", "1", "-o", out, "--plan", plan, "--json",
                              "--repeat", "3")
    assert code == 0
    report = json.loads(stdout)
    assert report["total"]["macs_after"] < report["total"]["macs_before"]
    assert report["total"]["params_after"] < report["total"]["params_before"]
    assert report["latency"]["threads"] == 1 and report["latency"]["after_ms"] > 0
    assert report["self_check_max_abs"] < 1e-4
    assert digest(residual_path) == before  # the input is never modified
    onnx.checker.check_model(str(out), full_check=True)
    document = json.loads(plan.read_text())
    assert document["format"] == "onnxprune-plan/1"
    assert document["method"] == "fpgm" and document["ratio"] == 0.5
    names = {s["tensor"] for s in document["slices"]}
    # Every sliced tensor is named as in the input model.
    assert names <= {i.name for i in onnx.load(str(residual_path)).graph.initializer}
    assert {"w1", "b1", "w2", "b2", "w3"} <= names
    assert not list(tmp_path.glob(".onnxprune-*"))  # no temporary leftovers


def test_plan_zeroed_in_the_input_model_is_the_oracle(residual_path, tmp_path, capsys):
    """Zero exactly the plan's entries in the *input* file: same outputs as the pruned model."""
    import onnxruntime as ort

    out, plan = tmp_path / "out.onnx", tmp_path / "plan.json"
    assert run_cli(capsys, residual_path, "--ratio", "0.4", "--round-to", "1", "-o", out,
                   "--plan", plan, "--no-validate")[0] == 0
    model = onnx.load(str(residual_path))
    tensors = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    for entry in json.loads(plan.read_text())["slices"]:
        assert "consumer" not in entry
        index = [slice(None)] * tensors[entry["tensor"]].ndim
        index[entry["axis"]] = entry["removed"]
        tensors[entry["tensor"]][tuple(index)] = 0
    del model.graph.initializer[:]
    model.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in tensors.items())
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_apply_reapplies_a_plan_to_retrained_weights(residual_path, tmp_path, capsys):
    out, plan = tmp_path / "out.onnx", tmp_path / "plan.json"
    assert run_cli(capsys, residual_path, "--ratio", "0.5", "--round-to", "1", "-o", out,
                   "--plan", plan, "--no-validate")[0] == 0
    # "More training": same graph, new weights. The plan still removes the same channels.
    from conftest import residual_model
    retrained = tmp_path / "retrained.onnx"
    onnx.save(residual_model(seed=7), str(retrained))
    again, plan2 = tmp_path / "again.onnx", tmp_path / "plan2.json"
    code, _, err = run_cli(capsys, "apply", retrained, plan, "-o", again, "--plan", plan2,
                           "--repeat", "2")
    assert code == 0, err
    first, second = json.loads(plan.read_text()), json.loads(plan2.read_text())
    assert first["slices"] == second["slices"]
    assert [g["removed"] for g in first["groups"]] == [g["removed"] for g in second["groups"]]


def test_analyze_lists_groups_and_reasons(residual_path, capsys):
    code, stdout, _ = run_cli(capsys, "analyze", residual_path, "--json")
    assert code == 0
    report = json.loads(stdout)
    by_producers = {tuple(g["producers"]): g for g in report["groups"]}
    assert by_producers[("conv1", "conv2")]["prunable"]  # coupled by the residual add
    assert by_producers[("conv1", "conv2")]["channels"] == 16
    assert by_producers[("fc",)]["frozen"] == ["reaches graph output 'y'"]
    assert 0 < by_producers[("conv1", "conv2")]["macs_share"] <= 1
    code, stdout, _ = run_cli(capsys, "analyze", residual_path)
    assert code == 0 and "reaches graph output" in stdout


def test_nothing_prunable_exits_zero(tmp_path, capsys):
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    code, stdout, _ = run_cli(capsys, path, "-o", tmp_path / "out.onnx", "--repeat", "2")
    assert code == 0 and "nothing to prune" in stdout
    onnx.checker.check_model(str(tmp_path / "out.onnx"), full_check=True)


def _external_model(tmp_path: Path, location: str) -> Path:
    from conftest import residual_model
    model = residual_model()
    path = tmp_path / "ext.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="ext.data",
              size_threshold=0)
    proto = onnx.load(str(path), load_external_data=False)
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(path))
    return path


def test_external_data_round_trip(tmp_path, capsys):
    path = _external_model(tmp_path, "ext.data")
    out = tmp_path / "out.onnx"
    code, _, err = run_cli(capsys, path, "--round-to", "1", "-o", out, "--repeat", "2")
    assert code == 0, err
    assert (tmp_path / "out.onnx.data").is_file()  # external in, external out
    onnx.checker.check_model(str(out), full_check=True)


def _bad(tmp_path: Path, kind: str) -> list:
    from conftest import residual_model
    good = tmp_path / "good.onnx"
    onnx.save(residual_model(), str(good))
    out = tmp_path / "out.onnx"
    if kind == "missing":
        return [tmp_path / "nope.onnx", "-o", out]
    if kind == "truncated":
        bad = tmp_path / "trunc.onnx"
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        return [bad, "-o", out]
    if kind == "not-onnx":
        bad = tmp_path / "notes.onnx"
        bad.write_text("this is not a model\n" * 20)
        return [bad, "-o", out]
    if kind == "empty":
        bad = tmp_path / "empty.onnx"
        bad.write_bytes(b"")
        return [bad, "-o", out]
    if kind == "ratio-high":
        return [good, "--ratio", "1.0", "-o", out]
    if kind == "ratio-negative":
        return [good, "--ratio", "-0.2", "-o", out]
    if kind == "ratio-text":
        return [good, "--ratio", "half", "-o", out]
    if kind == "target-macs-hgsr":  # HGSR's greedy path, which does not go through select()
        np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 8, 8), np.float32))
        return [good, "--method", "hgsr", "--data", tmp_path / "d.npz", "--target-macs", "0",
                "-o", out]
    if kind == "method":
        return [good, "--method", "magic", "-o", out]
    if kind == "same-output":
        return [good, "-o", good]
    if kind == "unwritable":
        blocker = tmp_path / "file"
        blocker.write_text("x")
        return [good, "-o", blocker / "out.onnx"]
    if kind == "external-missing":
        path = _external_model(tmp_path, "ext.data")
        (tmp_path / "ext.data").unlink()
        return [path, "-o", out]
    if kind == "external-outside":
        return [_external_model(tmp_path, "../outside.data"), "-o", out]
    if kind == "data-missing":
        return [good, "--data", tmp_path / "nope.npz", "-o", out]
    if kind == "data-shape":
        np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 5, 5), np.float32))
        return [good, "--data", tmp_path / "d.npz", "-o", out]
    if kind == "plan-missing":
        return ["apply", good, tmp_path / "nope.json", "-o", out]
    if kind == "plan-garbage":
        (tmp_path / "p.json").write_text("{not json")
        return ["apply", good, tmp_path / "p.json", "-o", out]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind,code,needle", [
    ("missing", 3, "no such file"),
    ("truncated", 3, "not a valid ONNX model"),
    ("not-onnx", 3, "not a valid ONNX model"),
    ("empty", 3, "not a valid ONNX model"),
    ("ratio-high", 2, "ratio must be in [0, 1)"),
    ("ratio-negative", 2, "ratio must be in [0, 1)"),
    ("ratio-text", 2, "ratio must be a number"),
    ("target-macs-hgsr", 2, "--target-macs must be in (0, 1]"),
    ("method", 2, "invalid choice"),
    ("same-output", 4, "is the input file"),
    ("unwritable", 4, "cannot write"),
    ("external-missing", 3, "is missing"),
    ("external-outside", 3, "outside the model's folder"),
    ("data-missing", 3, "no such data file"),
    ("data-shape", 3, "expects"),
    ("plan-missing", 3, "no such plan file"),
    ("plan-garbage", 3, "not a JSON plan file"),
])
def test_bad_input_is_one_line_and_an_exit_code(tmp_path, capsys, kind, code, needle):
    args = _bad(tmp_path, kind)
    inputs = [a for a in args if isinstance(a, Path) and a.is_file()]
    before = {p: digest(p) for p in inputs}
    got, _, err = run_cli(capsys, *args)
    assert got == code, err
    assert_one_line_error(err, needle)
    assert {p: digest(p) for p in inputs} == before
    if kind != "same-output":
        assert not (tmp_path / "out.onnx").exists()


def test_quantized_model_is_declined(tmp_path, capsys):
    from zoo_onnx import ONNX_CASES
    case = next(c for n, c in ONNX_CASES.items() if "q" in n.lower() and not c.prunable
                and ("qdq" in n.lower() or "quant" in n.lower()))
    path = tmp_path / "q.onnx"
    onnx.save(case.make(), str(path))
    code, _, err = run_cli(capsys, path, "-o", tmp_path / "out.onnx")
    assert code == 5
    assert_one_line_error(err, "quantized models are not supported")


def test_plan_that_does_not_fit_is_refused(residual_path, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert run_cli(capsys, residual_path, "--ratio", "0.5", "--round-to", "1", "-o",
                   tmp_path / "a.onnx", "--plan", plan, "--no-validate")[0] == 0
    from conftest import residual_model
    other = tmp_path / "other.onnx"
    onnx.save(residual_model(channels=4), str(other))
    code, _, err = run_cli(capsys, "apply", other, plan, "-o", tmp_path / "b.onnx")
    assert code == 5
    assert_one_line_error(err, "plan does not fit this model")


def test_module_and_console_script_entry_points(residual_path, tmp_path):
    for command in ([sys.executable, "-m", "onnxprune"],
                    [str(Path(sys.executable).parent / "onnxprune")]):
        done = subprocess.run([*command, str(residual_path), "--ratio", "2"],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert done.returncode == 2
        assert done.stderr.strip() == "onnxprune: error: ratio must be in [0, 1), got 2.0"


def test_exclude_leaves_matching_layers_alone(residual_path, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    code, _, err = run_cli(capsys, residual_path, "--ratio", "0.5", "--round-to", "1",
                           "--exclude", "conv3", "-o", tmp_path / "o.onnx", "--plan", plan,
                           "--no-validate")
    assert code == 0, err
    document = json.loads(plan.read_text())
    by_producer = {g["producers"][0]["node"]: g for g in document["groups"]}
    assert by_producer["conv3"]["removed"] == []
    assert by_producer["conv3"]["frozen"] == ["'conv3' excluded by --exclude"]
    assert by_producer["conv1"]["removed"]  # the others are still pruned
    # a tensor-name pattern works too
    code, _, _ = run_cli(capsys, residual_path, "--exclude", "w[12]", "--round-to", "1",
                         "-o", tmp_path / "o2.onnx", "--plan", plan, "--no-validate")
    assert code == 0
    by_producer = {g["producers"][0]["node"]: g for g in json.loads(plan.read_text())["groups"]}
    assert by_producer["conv1"]["removed"] == [] and by_producer["conv1"]["frozen"]
    assert by_producer["conv3"]["removed"]
