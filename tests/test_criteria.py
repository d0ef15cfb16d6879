"""Data-driven criteria against direct computation of their formulas (issue: Taylor,
Taylor-FO-BN, bn-scale, HGSR), and their input errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from conftest import residual_model
from onnxprune import analyze, load_normalized, score
from onnxprune.cli import main
from onnxprune.criteria import Gradients
from onnxprune.errors import InputError, UsageError
from onnxprune.score import score_group


def bn_model(seed: int = 0) -> onnx.ModelProto:
    """x → conv1 → BN → Relu → conv2 (no BN) → Relu → GAP → Flatten → Gemm → y."""
    rng = np.random.default_rng(seed)

    def t(name, *shape, positive=False):
        a = rng.standard_normal(shape).astype(np.float32)
        return numpy_helper.from_array(np.abs(a) + 0.5 if positive else a * 0.3, name)

    inits = [t("w1", 8, 3, 3, 3), t("b1", 8), t("g", 8), t("beta", 8), t("mean", 8),
             t("var", 8, positive=True), t("w2", 6, 8, 3, 3), t("b2", 6), t("fc_w", 4, 6),
             t("fc_b", 4)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["n1"],
                         name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info("x", 1, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", 1, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}


def _save(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _group_of(a, producer):
    return next(g for g in a.groups if any(p.node.name == producer for p in g.producers))


@pytest.mark.parametrize("per_batch", [False, True])
def test_taylor_criteria_match_their_formulas(tmp_path, per_batch):
    model = bn_model()
    w = _weights(model)
    rng = np.random.default_rng(1)
    grads = {n: rng.standard_normal(((3,) if per_batch else ()) + w[n].shape)
             for n in ("w1", "w2", "fc_w")}
    np.savez(tmp_path / "g.npz", **grads)
    a = analyze(load_normalized(_save(tmp_path, model)))
    g = Gradients(tmp_path / "g.npz")
    group = _group_of(a, "conv2")
    wf, gf = w["w2"].reshape(6, -1), grads["w2"].reshape((-1, 6, 27 * 8 // 3))
    expected_taylor = np.mean(np.einsum("cs,bcs->bc", wf, gf) ** 2, axis=0)
    expected_sq = np.mean(((wf[None] * gf) ** 2).sum(axis=2), axis=0)
    # a single-producer group normalized by its mean: compare up to that scale
    got = score_group(a, group, "taylor", grads=g, normalizer="none")
    np.testing.assert_allclose(got, expected_taylor, rtol=1e-10)
    got = score_group(a, group, "taylor-sq", grads=g, normalizer="none")
    np.testing.assert_allclose(got, expected_sq, rtol=1e-10)
    # direct loop, for the reader: channel 0, batch-averaged (Σ_s w_s g_s)²
    per = [(w["w2"][0] * b[0]).sum() ** 2 for b in grads["w2"].reshape((-1,) + w["w2"].shape)]
    assert got is not None and np.isclose(expected_taylor[0], np.mean(per))


def test_taylor_bn_uses_the_gate_after_bn_and_falls_back_elsewhere(tmp_path):
    model = bn_model()
    w = _weights(model)
    rng = np.random.default_rng(2)
    grads = {"w1": rng.standard_normal((2, 8, 3, 3, 3)), "w2": rng.standard_normal((2, 6, 8, 3, 3)),
             "g": rng.standard_normal((2, 8)), "beta": rng.standard_normal((2, 8))}
    np.savez(tmp_path / "g.npz", **grads)
    a = analyze(load_normalized(_save(tmp_path, model)))
    g = Gradients(tmp_path / "g.npz")
    expected = np.mean((w["g"] * grads["g"] + w["beta"] * grads["beta"]) ** 2, axis=0)
    got = score_group(a, _group_of(a, "conv1"), "taylor-bn", grads=g, normalizer="none")
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # conv2 has no BN after it: the weight criterion
    np.testing.assert_allclose(
        score_group(a, _group_of(a, "conv2"), "taylor-bn", grads=g, normalizer="none"),
        score_group(a, _group_of(a, "conv2"), "taylor", grads=g, normalizer="none"))


def test_bn_scale_is_abs_gamma_and_needs_bn(tmp_path):
    model = bn_model()
    a = analyze(load_normalized(_save(tmp_path, model)))
    got = score_group(a, _group_of(a, "conv1"), "bn-scale", normalizer="none")
    np.testing.assert_allclose(got, np.abs(_weights(model)["g"]))
    assert np.isinf(score_group(a, _group_of(a, "conv2"), "bn-scale")).all()  # never chosen
    no_bn = analyze(load_normalized(_save(tmp_path, residual_model(), "r.onnx")))
    with pytest.raises(UsageError, match="unfused BatchNormalization"):
        score(no_bn, "bn-scale")


@pytest.mark.parametrize("form", ["l1/2", "l2"])
def test_hgsr_feature_wise_scores(tmp_path, form):
    model = residual_model(channels=6)
    w = _weights(model)
    a = analyze(load_normalized(_save(tmp_path, model)))
    group = _group_of(a, "conv1")  # conv1 + conv2 (residual); read by conv2 and conv3
    expected = np.zeros(6)
    for name in ("w2", "w3"):
        weight = w[name]  # [O, I, k, k]
        for i in range(6):
            block = weight[:, i].reshape(weight.shape[0], -1)
            per_o = (np.sqrt(np.abs(block).sum(axis=1)) if form == "l1/2"
                     else np.linalg.norm(block, axis=1))
            expected[i] += per_o.sum() ** 2
    np.testing.assert_allclose(score_group(a, group, "hgsr", hgsr_form=form), expected,
                               rtol=1e-10)


def test_hgsr_counts_all_positions_of_a_flattened_channel(tmp_path):
    # conv3's channels reach the Gemm through GAP+Flatten; fc reads one position each.
    model = residual_model(channels=6)
    a = analyze(load_normalized(_save(tmp_path, model)))
    group = _group_of(a, "conv3")
    fc = _weights(model)["fc_w"]  # [10, 6]
    np.testing.assert_allclose(score_group(a, group, "hgsr"),
                               np.sqrt(np.abs(fc)).sum(axis=0) ** 2, rtol=1e-10)


@pytest.mark.parametrize("content,needle", [
    ({"w1": np.zeros((8, 3, 3, 3))}, "has no tensor 'w2'"),
    ({"w1": np.zeros((8, 3, 3, 3)), "w2": np.zeros((6, 8, 3))},
     "gradient 'w2' has shape [6, 8, 3]"),
    (None, "no such gradients file"),
])
def test_gradient_errors_name_the_tensor(tmp_path, capsys, content, needle):
    path = _save(tmp_path, bn_model())
    grads = tmp_path / "g.npz"
    if content is not None:
        np.savez(grads, **content)
    code = main([str(path), "--method", "taylor", "--grads", str(grads), "-o",
                 str(tmp_path / "o.onnx"), "--no-validate"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_taylor_without_grads_is_a_usage_error(tmp_path, capsys):
    path = _save(tmp_path, bn_model())
    assert main([str(path), "--method", "taylor", "-o", str(tmp_path / "o.onnx")]) == 2
    assert "needs --grads" in capsys.readouterr().err


def test_gradients_reject_non_npz(tmp_path):
    (tmp_path / "g.npz").write_text("nope")
    with pytest.raises(InputError):
        Gradients(tmp_path / "g.npz")
