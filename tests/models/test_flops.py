"""The analytic cost model (``models/flops.py``) on a case small enough to count by hand."""

from __future__ import annotations

import dataclasses

from persrec.models import flops
from persrec.models.config import ModelConfig


def cfg() -> ModelConfig:
    # 1 layer, D = 2, one head of 2, K = 1 memory token, a window of 3 after each fold of 2
    return ModelConfig(num_items=5, dim=2, num_layers=1, num_heads=1, head_dim=2, max_len=10,
                       num_memory_tokens=1, recent_len=3, segment_len=2, policy="incremental")


def test_a_cached_event_is_one_query_over_the_memory_and_the_cached_items() -> None:
    # the 3rd recent item: 1 query, keys = 1 memory token + 2 cached items + itself = 4 pairs
    # uvqk 2*1*2*(4*2) = 32, output 2*1*2*2 = 8, attention 2 * 4 pairs * 2 * 2 = 32; scores 2*2*5 = 20
    assert flops.cached_request_flops(cfg(), 3) == 32 + 8 + 32 + 20
    # without the cache the same request re-runs the 3 items: 3 queries, 3 + 6 = 9 pairs
    assert flops.memory_request_flops(cfg(), 3) == 3 * 40 + 2 * 9 * 2 * 2 + 20


def test_a_fold_costs_a_cached_model_the_fold_and_the_rebuilt_window() -> None:
    # fold: [S (2) | T (1)] = 3 queries after 1 memory key: 3 + 6 = 9 pairs -> 3 * 40 + 2*9*2*2 = 192
    # rebuild: recent_len - 1 = 2 items after 1 memory key: 2 + 3 = 5 pairs -> 2 * 40 + 2*5*2*2 = 120
    assert flops.fold_flops(cfg(), 2) == 192
    assert flops.cached_update_flops(cfg()) == 192 + 120


def test_a_request_time_model_sends_the_previous_item_again() -> None:
    timed = dataclasses.replace(cfg(), time_bias=True, request_time=True)
    # 2 queries after 1 memory key + 1 cached item: 2 * 2 + 3 = 7 pairs -> 2 * 40 + 2*7*2*2 = 136; scores 20
    assert flops.cached_request_flops(timed, 3) == 136 + 20
    # the rebuild re-encodes recent_len - 2 = 1 item after the memory key: 1 + 1 = 2 pairs -> 40 + 16
    assert flops.cached_update_flops(timed) == 192 + 56
