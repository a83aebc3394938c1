"""How far the folds have got, for counting breach clusters on Kafka (no broker needed): the
watermark a partition's fold has reached at its committed offset, and the lowest of them."""

from __future__ import annotations

from datetime import timedelta

from factories import T0
from loopservice.streams.kafka_clusters import FoldMarks, fold_watermark


def marks_of(*pairs: tuple[int, int, int]) -> FoldMarks:
    """(partition, next offset, hours after T0) pairs, as the tenant-wide reader records them."""
    marks = FoldMarks()
    for partition, offset, hours in pairs:
        marks.record(partition, offset, T0 + timedelta(hours=hours))
    return marks


def test_a_committed_offset_maps_to_the_mark_of_the_last_batch_before_it() -> None:
    marks = marks_of((0, 10, 1), (0, 20, 2), (0, 30, 3))
    assert marks.at(0, 9) is None  # the fold has not reached a batch end we know
    assert marks.at(0, 10) == T0 + timedelta(hours=1)
    assert marks.at(0, 25) == T0 + timedelta(hours=2)  # at least the mark at offset 20
    assert marks.at(0, 30) == T0 + timedelta(hours=3)
    assert marks.at(1, 30) is None


def test_a_mark_that_does_not_rise_is_not_recorded() -> None:
    marks = marks_of((0, 10, 2), (0, 20, 2), (0, 30, 1))
    assert marks.at(0, 25) == T0 + timedelta(hours=2)
    assert marks.at(0, 35) == T0 + timedelta(hours=2)


def test_forgetting_below_a_commit_keeps_the_mark_at_it() -> None:
    marks = marks_of((0, 10, 1), (0, 20, 2), (0, 30, 3))
    marks.forget_before(0, 25)
    assert marks.at(0, 25) == T0 + timedelta(hours=2)
    assert marks.at(0, 30) == T0 + timedelta(hours=3)


def test_the_slowest_fold_with_records_left_holds_the_watermark() -> None:
    marks = marks_of((0, 10, 1), (0, 20, 5), (1, 10, 3), (1, 20, 4))
    committed = {0: 20, 1: 10}
    assert fold_watermark(marks, committed, {0: 40, 1: 40}) == T0 + timedelta(hours=3)


def test_a_caught_up_fold_holds_nothing_back() -> None:
    marks = marks_of((0, 20, 1), (1, 10, 3), (1, 20, 4))
    committed = {0: 20, 1: 10}  # partition 0 has folded all it has
    assert fold_watermark(marks, committed, {0: 20, 1: 40}) == T0 + timedelta(hours=3)
    # once all are caught up: the lowest of their final marks
    assert fold_watermark(marks, {0: 20, 1: 20}, {0: 20, 1: 20}) == T0 + timedelta(hours=1)


def test_no_watermark_while_a_fold_with_records_has_committed_nothing_known() -> None:
    marks = marks_of((0, 20, 5))
    assert fold_watermark(marks, {0: 20}, {0: 30, 1: 5}) is None
    assert fold_watermark(marks, {}, {0: 30}) is None
    # an empty partition is no reason to wait
    assert fold_watermark(marks, {0: 20}, {0: 30, 1: 0}) == T0 + timedelta(hours=5)
