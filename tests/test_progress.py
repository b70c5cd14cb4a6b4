"""Progress in words: what runs, how long it has taken and about how long is left."""
from engine.progress import Progress, timing_words


def test_a_measuring_step_in_a_sweep_reads_as_words():
    event = Progress("measure", step=4, total=10).within(index=2, count=8)
    assert event.describe() == "Run 2 of 8: measuring step 4 of 10"


def test_time_left_is_extrapolated_from_the_share_done():
    assert timing_words(12, 0.4) == "12 s elapsed · about 18 s left"
    assert timing_words(600, 0.5) == "10 min elapsed · about 10 min left"


def test_no_estimate_before_there_is_something_to_extrapolate_from():
    assert timing_words(1, 0.01) == "1 s elapsed"
    assert timing_words(5, 1.0) == "5 s elapsed"


def test_durations_read_in_the_unit_that_suits_them():
    from engine.progress import duration_words
    assert [duration_words(s) for s in (42, 720, 5400)] == ["42 s", "12 min", "1.5 h"]
