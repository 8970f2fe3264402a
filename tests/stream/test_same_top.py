"""same_top: a served top-k equals the offline one up to the order of tied items."""

from persrec.testing.pipeline import same_top


def served(pairs):
    return [{"item_id": i, "score": s} for i, s in pairs]


IDS, SCORES = ["a", "b", "c", "d"], [0.9, 0.8, 0.79995, 0.5]


def test_equal_and_tied_swaps_pass() -> None:
    assert same_top(served(zip(IDS, SCORES)), IDS, SCORES)
    assert same_top(served([("a", 0.9), ("c", 0.79995), ("b", 0.8), ("d", 0.5)]), IDS, SCORES)
    assert same_top(served([("a", 0.9), ("b", 0.8), ("c", 0.79995), ("e", 0.50003)]), IDS, SCORES)


def test_other_items_or_scores_fail() -> None:
    assert not same_top(served([("b", 0.9), ("a", 0.8), ("c", 0.79995), ("d", 0.5)]), IDS, SCORES)
    assert not same_top(served([("a", 0.9), ("b", 0.8), ("c", 0.79995), ("d", 0.6)]), IDS, SCORES)
    assert not same_top(served([("a", 0.9), ("b", 0.8), ("c", 0.79995)]), IDS, SCORES)
