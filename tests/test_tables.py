"""Table builders: headers in words, a dash for what is unknown, numbers that stay numbers."""
from app import tables
from tests.app_fixtures import make_result


def test_engine_keys_become_words_and_unknown_values_a_dash():
    rows = [{"capacity": "this cpu (16.0 GiB)", "capacity_bytes": 16.0, "fitted_max_batch": None, "analytic_max_batch": 128}]
    frame = tables.in_words(rows, drop=("capacity_bytes",))
    assert list(frame.columns) == ["memory", "largest batch (fit)", "largest batch (analytic)"]
    assert frame.iloc[0].tolist() == ["this cpu (16.0 GiB)", "–", 128]
    assert "None" not in frame.to_string()


def test_failed_runs_have_empty_numbers_not_none_strings():
    frame = tables.runs_frame([make_result(batch=2), make_result("oom", batch=64)])
    assert frame["samples/s"].isna().tolist() == [False, True]
    assert frame["samples/s"].dtype == "float64"


def test_a_diff_shows_memory_in_gib_never_raw_bytes():
    a, b = make_result(batch=2), make_result(batch=4)
    _, metrics = tables.diff_runs(a, b)
    rows = dict(zip(metrics["metric"], metrics["A"]))
    assert "peak_allocated (GiB)" in rows and not any(name.endswith("_bytes") for name in rows)
    assert rows["peak_allocated (GiB)"] == a.metrics.peak_allocated_bytes / 2**30
