"""builder.worker: which buffered rows make a worker's next shard."""

from __future__ import annotations

from collections import Counter

from builder.worker import mixed_take


def test_a_shard_takes_the_classes_in_turn_oldest_first():
    labels = ["dog"] * 12 + ["cat"] * 12 + ["bird"] * 3
    picked = mixed_take(labels, 8)
    assert picked == sorted(picked) and len(set(picked)) == 8
    assert Counter(labels[i] for i in picked) == {"bird": 3, "cat": 3, "dog": 2}
    for label in ("dog", "cat", "bird"):
        mine = [i for i, other in enumerate(labels) if other == label]
        taken = [i for i in picked if labels[i] == label]
        assert taken == mine[:len(taken)]


def test_a_shard_of_one_class_is_its_oldest_rows():
    assert mixed_take(["cat"] * 5, 3) == [0, 1, 2]
    assert mixed_take(["cat", "dog"], 2) == [0, 1]
