"""Random training windows over customer histories."""

import numpy as np
import pytest

from txformer.data import RandomWindow


def histories(lengths: list[int]) -> dict[str, list]:
    return {
        "customer_id": list(range(len(lengths))),
        "event_time": [list(np.arange(n, dtype=float)) for n in lengths],
        "mcc_code": [list(np.arange(n) + 1000) for n in lengths],
        "amount": [list(-np.arange(n, dtype=float)) for n in lengths],
        "labels": [row % 2 for row in range(len(lengths))],
        "num_events": list(lengths),
    }


def test_windows_are_contiguous_aligned_and_within_bounds():
    lengths = [1, 5, 40, 300]
    window = RandomWindow(max_length=32, min_share=0.5)
    starts, sizes = set(), set()
    for epoch in range(200):
        window.epoch = epoch
        batch = window(histories(lengths))
        for row, full in enumerate(lengths):
            times = batch["event_time"][row]
            kept = min(full, 32)
            assert int(np.ceil(0.5 * kept)) <= len(times) <= kept == min(full, 32)
            start = int(times[0])
            assert times == list(np.arange(start, start + len(times), dtype=float))
            assert batch["mcc_code"][row] == [code + 1000 for code in range(start, start + len(times))]
            assert batch["amount"][row] == [-value for value in times]
            assert batch["num_events"][row] == len(times)
            if full == 300:
                starts.add(start)
                sizes.add(len(times))
        assert batch["labels"] == [0, 1, 0, 1] and batch["customer_id"] == [0, 1, 2, 3]
    assert len(starts) > 100 and sizes == set(range(16, 33))


def test_a_window_depends_on_seed_epoch_and_customer_only():
    window = RandomWindow(max_length=32, seed=3, epoch=1)
    alone = window(histories([300]))["event_time"][0]
    in_batch = window({**histories([300, 300]), "customer_id": [7, 0]})["event_time"][1]
    assert alone == in_batch
    window.epoch = 2
    assert window(histories([300]))["event_time"][0] != alone


def test_columns_without_events_pass_through_and_bad_shares_are_refused():
    assert RandomWindow()({"num_events": [3, 4]}) == {"num_events": [3, 4]}
    with pytest.raises(ValueError, match="min_share"):
        RandomWindow(min_share=0)
