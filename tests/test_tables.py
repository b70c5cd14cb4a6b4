"""Table builders: headers in words, a dash for what is unknown, numbers that stay numbers."""
from app import tables
from engine.config import BenchConfig
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


def test_a_queue_matches_results_finished_out_of_order_to_their_configs():
    from engine.config import BenchConfig

    configs = [BenchConfig(device="cpu", batch=b) for b in (1, 2, 4)]
    # On a box with two GPUs the third config finished first, then the first one.
    results = [make_result(batch=4), make_result("oom", batch=1)]
    frame = tables.queue_frame(configs, results, finished=False)
    assert list(frame["batch"]) == [1, 2, 4]
    assert list(frame["state"]) == ["done", "running", "done"]
    assert list(frame["status"])[::2] == ["oom", "ok"]


def test_the_runs_table_names_data_parallel_runs_and_shows_compile_time():
    ddp = make_result(batch=4).replace(config=BenchConfig(batch=4, nproc=2, parallel="fsdp", reshard=False))
    frame = tables.runs_frame([ddp, make_result(batch=2)])
    assert frame["data parallel"].iloc[0] == "FSDP × 2 ranks, no reshard" and frame["data parallel"].isna().iloc[1]
    assert "compile s" in frame.columns and "compile" in frame.columns
