"""Planning rules: the papers' floor(r·C), rounding, never a whole group."""

from __future__ import annotations

import numpy as np
import pytest

from onnxprune import analyze, load_normalized, score, select
from onnxprune.errors import UsageError
from onnxprune.plan import channels_to_remove, check_ratio


@pytest.mark.parametrize("channels,ratio,round_to,expected", [
    (64, 0.4, 1, 25),    # floor(25.6)
    (10, 0.5, 1, 5),
    (10, 0.99, 1, 9),    # never all
    (2, 0.5, 1, 1),
    (64, 0.4, 8, 24),    # keep 39 -> 40
    (16, 0.4, 8, 0),     # keep 10 -> 16: rounding never removes more than the ratio asks
    (20, 0.5, 8, 4),     # keep 10 -> 16
    (3, 0.9, 8, 0),
    (64, 0.0, 1, 0),
])
def test_channels_to_remove(channels, ratio, round_to, expected):
    assert channels_to_remove(channels, ratio, round_to) == expected


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_ratio(ratio):
    with pytest.raises(UsageError):
        check_ratio(ratio)


def test_select_removes_the_lowest_scores_and_keeps_rounding(residual_path):
    a = analyze(load_normalized(residual_path))
    scores = score(a, "l1")
    selection = select(a, scores, 0.5, round_to=4)
    assert selection
    for index, positions in selection.items():
        group = a.groups[index]
        kept = group.channels - len(positions)
        assert kept % 4 == 0 and kept >= 1
        threshold = np.sort(scores[index])[len(positions) - 1]
        assert (scores[index][positions] <= threshold).all()
    assert all(not a.groups[i].frozen for i in selection)
