"""Scorers against direct computation of the papers' formulas."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune import analyze, load_normalized, score
from onnxprune.score import distance_sums, filters, fpgm, l1, l2, score_group


@pytest.fixture
def filters_matrix():
    rng = np.random.default_rng(3)
    return rng.standard_normal((24, 3, 3, 3)).astype(np.float32).reshape(24, -1)


def direct_distance_sums(f: np.ndarray) -> np.ndarray:
    f = f.astype(np.float64)
    return np.array([sum(np.linalg.norm(f[i] - f[j]) for j in range(len(f)))
                     for i in range(len(f))])


def test_l1_l2_match_the_norms(filters_matrix):
    f64 = filters_matrix.astype(np.float64)
    np.testing.assert_allclose(l1(filters_matrix), np.abs(f64).sum(axis=1), rtol=1e-12)
    np.testing.assert_allclose(l2(filters_matrix), np.linalg.norm(f64, axis=1), rtol=1e-12)


def test_fpgm_paper_form_is_the_euclidean_distance_sum(filters_matrix):
    np.testing.assert_allclose(fpgm(filters_matrix), direct_distance_sums(filters_matrix),
                               rtol=1e-9)


def test_fpgm_blocks_give_the_same_sums(filters_matrix):
    np.testing.assert_allclose(distance_sums(filters_matrix, block_rows=5),
                               distance_sums(filters_matrix), rtol=1e-12)


def test_fpgm_prunes_the_filter_at_the_median_first():
    # Filters around a centre: the one at the centre is the most replaceable.
    rng = np.random.default_rng(0)
    f = rng.standard_normal((9, 16))
    f[4] = f.mean(axis=0)
    assert int(np.argmin(fpgm(f))) == 4


def test_fpgm_official_variant_ranks_small_norms_first_then_distances(filters_matrix):
    f = filters_matrix.astype(np.float64)
    n = len(f)
    scores = fpgm(f, norm_fraction=0.25)
    by_norm = np.argsort(np.linalg.norm(f, axis=1), kind="stable")[: int(n * 0.25)]
    ranking = np.argsort(scores, kind="stable")
    # The norm-pruned filters come first, in norm order ...
    np.testing.assert_array_equal(ranking[: len(by_norm)], by_norm)
    # ... then the survivors by distance sums computed among the survivors only.
    survivors = np.sort(np.setdiff1d(np.arange(n), by_norm))
    np.testing.assert_allclose(scores[survivors], direct_distance_sums(f[survivors]), rtol=1e-9)


def test_scores_are_deterministic_float64(filters_matrix):
    a, b = fpgm(filters_matrix), fpgm(filters_matrix.copy())
    assert a.dtype == np.float64
    np.testing.assert_array_equal(a, b)


def test_filters_of_transposed_and_plain_gemm_weights(tmp_path):
    from conftest import residual_model
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(residual_model(), str(path))
    a = analyze(load_normalized(path))
    fc = next(p for p in a.producers if p.node.name == "fc")
    w = fc.node.inputs[1].const_value.numpy()  # [10, C] with transB=1: rows are filters
    np.testing.assert_array_equal(filters(fc), w)


def test_group_with_two_producers_averages_mean_normalized_scores(residual_path):
    a = analyze(load_normalized(residual_path))
    group = next(g for g in a.groups if len(g.producers) == 2)  # conv1 + conv2, residual add
    per_layer = []
    for p in group.producers:
        w = p.node.inputs[1].const_value.numpy().reshape(len(p.ids), -1).astype(np.float64)
        s = np.linalg.norm(w, axis=1)
        per_layer.append(s / s.mean())
    expected = (per_layer[0] + per_layer[1]) / 2  # channel k of both layers is one channel
    np.testing.assert_allclose(score_group(a, group, "l2"), expected, rtol=1e-12)
    maxed = [s * s.mean() / s.max() for s in per_layer]
    np.testing.assert_allclose(score_group(a, group, "l2", normalizer="max", reduction="max"),
                               np.maximum(*maxed), rtol=1e-12)


def test_random_is_seeded(residual_path):
    a = analyze(load_normalized(residual_path))
    one, two, other = (score(a, "random", seed=s) for s in (1, 1, 2))
    assert all(np.array_equal(one[k], two[k]) for k in one)
    assert any(not np.array_equal(one[k], other[k]) for k in one)


def test_fpgm_on_a_wide_layer_uses_the_blocked_gram(monkeypatch):
    import sys

    s = sys.modules["onnxprune.score"]  # the package exports the function under the same name

    rng = np.random.default_rng(1)
    f = rng.standard_normal((64, 40))
    monkeypatch.setattr(s, "_CHUNK_BYTES", 64 * 8 * 3)  # forces 3-column chunks
    np.testing.assert_allclose(s.distance_sums(f, block_rows=7), direct_distance_sums(f),
                               rtol=1e-9)
