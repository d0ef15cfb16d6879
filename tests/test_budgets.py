"""Budgets and data-driven selection: global ranking, MAC targets, per-layer ratios, the
masked scoring model, HGSR's greedy selection, sensitivity and eval."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import ROOT, residual_model
from onnxprune import analyze, apply, load_normalized, score, select
from onnxprune.cli import main
from onnxprune.greedy import greedy_select
from onnxprune.load import to_proto_bytes
from onnxprune.masks import MaskedModel, cross_entropy
from onnxprune.metrics import total_macs
from onnxprune.plan import MacsModel, parse_ratio_for, removed_roots

DEMO = ROOT / "models" / "resnet_fmnist.onnx"
DEMO_DATA = ROOT / "models" / "fashion_mnist_val.npz"


def _fresh(path):
    return analyze(load_normalized(path))


def _pruned_macs(path, selection) -> float:
    a = _fresh(path)
    return total_macs(apply(a, selection).model)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_target_macs_lands_within_one_channel_per_group(scope):
    a = _fresh(DEMO)
    scores = score(a, "l1")
    before = a.total_macs
    selection = select(a, scores, 0.0, 1, scope=scope, target_macs=0.5)
    after = _pruned_macs(DEMO, selection)  # the real count, after surgery
    assert after <= 0.5 * before
    assert MacsModel(a).of(a, selection) == pytest.approx(after)
    # Removing one channel fewer in every pruned group misses the target.
    fewer = {}
    for g, positions in selection.items():
        ranked = positions[np.argsort(scores[g][positions], kind="stable")]
        if len(ranked) > 1:
            fewer[g] = np.sort(ranked[:-1])
    assert MacsModel(a).of(a, fewer) > 0.5 * before


def test_global_ranking_never_empties_a_group_and_respects_the_cap():
    a = _fresh(DEMO)
    scores = score(a, "l2")
    selection = select(a, scores, 0.95, 1, scope="global")
    for g, positions in selection.items():
        assert len(positions) < a.groups[g].channels
    capped = select(a, scores, 0.9, 1, scope="global", max_layer_ratio=0.5)
    for g, positions in capped.items():
        assert len(positions) <= a.groups[g].channels // 2
    total = sum(int(0.9 * g.channels) for g in a.groups if g.prunable)
    uncapped = sum(len(p) for p in select(a, scores, 0.9, 1, scope="global").values())
    assert uncapped == total  # as many channels as the local rule, spread by score


def test_global_ranking_follows_normalized_scores():
    a = _fresh(DEMO)
    scores = score(a, "l1")
    selection = select(a, scores, 0.3, 1, scope="global")
    chosen = [scores[g][k] for g, p in selection.items() for k in p]
    left = [s for g, v in scores.items() if a.groups[g].prunable
            for k, s in enumerate(v) if k not in set(selection.get(g, []))]
    assert max(chosen) <= min(left)


def test_ratio_for_sets_per_layer_ratios():
    a = _fresh(DEMO)
    scores = score(a, "l1")
    rules = parse_ratio_for(["*layers.2*=0.75", "/stem*=0"])
    selection = select(a, scores, 0.25, 1, ratio_for=rules)
    for g in a.groups:
        if not g.prunable:
            continue
        names = " ".join(p.node.name for p in g.producers)
        want = 0 if names.startswith("/stem") else int((0.75 if "layers.2" in names else 0.25)
                                                       * g.channels)
        assert len(selection.get(g.index, [])) == want, names


def test_masked_model_computes_the_pruned_model():
    masked = MaskedModel(DEMO)
    a = masked.analysis
    x = np.load(DEMO_DATA)["x"][:16]
    selection = select(a, score(a, "random", seed=4), 0.5, 1)
    fresh = _fresh(DEMO)
    pruned = ort.InferenceSession(to_proto_bytes(apply(fresh, selection).model))
    want = pruned.run(None, {"input": x})[0]
    np.testing.assert_allclose(masked.run(x, removed_roots(a, selection)), want, atol=2e-5)


def test_greedy_hgsr_matches_brute_force(tmp_path):
    """With every channel a candidate, the masked greedy picks what rebuilding and running
    each pruned model picks."""
    path = tmp_path / "tiny.onnx"
    onnx.save(residual_model(channels=4), str(path))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 3, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, size=32)
    masked = MaskedModel(path)
    scores = score(masked.analysis, "hgsr")
    selection, trace = greedy_select(masked, scores, x, y, 0.5, candidates=100)

    groups = {g.index: g for g in _fresh(path).groups if g.prunable}
    budget = sum(int(0.5 * g.channels) for g in groups.values())
    chosen: dict[int, list[int]] = {}
    for _ in range(budget):
        best = None
        for g, group in groups.items():
            if len(chosen.get(g, [])) >= group.channels - 1:
                continue
            for k in range(group.channels):
                if k in chosen.get(g, []):
                    continue
                trial = {i: np.array(sorted(p)) for i, p in chosen.items()}
                trial[g] = np.array(sorted([*chosen.get(g, []), k]))
                model = apply(_fresh(path), trial).model
                out = ort.InferenceSession(to_proto_bytes(model)).run(None, {"x": x})[0]
                loss = cross_entropy(out, y)
                if best is None or loss < best[0] - 1e-9:
                    best = (loss, g, k)
        chosen.setdefault(best[1], []).append(best[2])
    assert {g: sorted(p.tolist()) for g, p in selection.items()} == \
        {g: sorted(p) for g, p in chosen.items()}
    assert len(trace) == budget


def _demo_greedy(**options):
    """HGSR's greedy selection on the embedded model and 32 validation samples."""
    masked = MaskedModel(DEMO)
    data = np.load(DEMO_DATA)
    scores = score(masked.analysis, "hgsr")
    selection, trace = greedy_select(masked, scores, data["x"][:32], data["y"][:32], 0.0,
                                     **options)
    return masked.analysis, scores, selection, trace


def test_greedy_hgsr_stops_at_a_macs_target():
    a, _, selection, trace = _demo_greedy(candidates=1, target_macs=0.7)
    after = _pruned_macs(DEMO, selection)  # counted on the real pruned model
    assert after <= 0.7 * a.total_macs
    # the removal before the last one was still above the target: it stopped at once
    last = trace[-1]
    fewer = {g: np.array([k for k in p if not (g == last["group"] and k in last["channels"])])
             for g, p in selection.items()}
    assert MacsModel(a).of(a, fewer) > 0.7 * a.total_macs


def test_greedy_hgsr_with_round_to_keeps_aligned_counts():
    a, scores, selection, trace = _demo_greedy(target_macs=0.6, round_to=8)
    assert MacsModel(a).of(a, selection) <= 0.6 * a.total_macs
    for g in a.groups:
        if g.index in selection:
            kept = g.channels - len(selection[g.index])
            assert kept % 8 == 0 or kept == g.channels % 8, (g.channels, kept)
    # each step took a group's lowest-scored remaining channels
    taken: dict[int, list[int]] = {}
    for step in trace:
        g, block = step["group"], step["channels"]
        rest = [k for k in np.argsort(scores[g], kind="stable") if k not in taken.get(g, [])]
        assert sorted(block) == sorted(int(k) for k in rest[:len(block)])
        taken.setdefault(g, []).extend(block)


def test_hgsr_cli_with_and_without_labels(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(residual_model(channels=8), str(path))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "train.npz", x=rng.standard_normal((40, 3, 8, 8)).astype(np.float32),
             y=rng.integers(0, 10, 40))
    np.savez(tmp_path / "nolabels.npz", x=rng.standard_normal((40, 3, 8, 8)).astype(np.float32))
    for data, source in (("train.npz", "labels"), ("nolabels.npz", "predictions")):
        code = main([str(path), "--method", "hgsr", "--data", str(tmp_path / data),
                     "--samples", "16", "--round-to", "1", "-o", str(tmp_path / "o.onnx"),
                     "--json", "--repeat", "2"])
        report = json.loads(capsys.readouterr().out)
        assert code == 0
        assert source in report["notes"][0] and "16 samples" in report["notes"][0]
        assert report["total"]["channels_after"] < report["total"]["channels_before"]


def test_sensitivity_and_eval_write_well_formed_json(tmp_path, capsys):
    sens = tmp_path / "sens.json"
    code = main(["sensitivity", str(DEMO), "--data", str(DEMO_DATA), "--samples", "64",
                 "--ratios", "0.3,0.6", "-o", str(sens), "--method", "l1"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    document = json.loads(sens.read_text())
    assert document["format"] == "onnxprune-sensitivity/1"
    assert document["metric"] == "accuracy" and 0 < document["baseline"] <= 1
    assert sens.with_suffix(".png").stat().st_size > 10_000
    assert all(len(g["points"]) == 2 and all(0 <= p["value"] <= 1 for p in g["points"])
               for g in document["groups"])
    assert all(g["points"][1]["macs"] <= g["points"][0]["macs"] for g in document["groups"])
    # ratios chosen from it meet a MACs budget
    out = tmp_path / "alloc.onnx"
    code = main([str(DEMO), "--ratios-from", str(sens), "--target-macs", "0.8", "--round-to",
                 "1", "-o", str(out), "--json", "--no-validate", "--method", "l1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["total"]["macs_after"] <= 0.8 * report["total"]["macs_before"]
    code = main(["eval", str(DEMO), str(out), "--data", str(DEMO_DATA), "--repeat", "3",
                 "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert len(report["models"]) == 2 and report["agreement"]["top1"] is not None
    assert report["accuracy"][0]["top1"] == pytest.approx(0.923, abs=1e-3)


def test_target_macs_out_of_reach_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(residual_model(), str(path))
    code = main([str(path), "--target-macs", "0.01", "-o", str(tmp_path / "o.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot reach --target-macs" in err
    assert not Path(tmp_path / "o.onnx").exists()
