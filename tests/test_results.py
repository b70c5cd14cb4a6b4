"""The v1 result schema: building, classifying, validating, reading and writing."""
import json

import pytest
import torch

from engine import BenchConfig
from engine.results import (
    METRIC_KEYS, SCHEMA, Env, Metrics, Result, ResultFormatError, classify_exception, dumps_jsonl, parse_results,
    read_results, write_jsonl,
)
from engine.stats import Summary

ENV = Env(device_type="cpu", device_name="test CPU", capacity_bytes=1, torch=torch.__version__, python="3", cpu="test CPU")
SUMMARY = Summary(median=10.0, p10=9.0, p90=11.0, iqr_rel=0.05)


def ok_result(**config_fields) -> Result:
    config = BenchConfig(device="cpu", **config_fields)
    metrics = Metrics(effective_batch=1, step_ms=SUMMARY, forward_ms=SUMMARY, backward_ms=SUMMARY, optimizer_ms=SUMMARY,
                      samples_per_s=800.0, peak_allocated_bytes=1234, mfu=float("nan"))
    samples = {phase: [9.0, 10.0, 11.0] for phase in ("step_ms", "forward_ms", "backward_ms", "optimizer_ms")}
    return Result.new(config, "ok", ENV, metrics=metrics, samples=samples, warnings=["noisy"], sweep_id="s1")


def ok_dict(**config_fields) -> dict:
    """An ok result as the JSON object a file holds."""
    return ok_result(**config_fields).to_dict()


def test_ok_result_has_every_metric_key_and_no_nan():
    result = ok_result(batch=4, accum=2)
    data = result.to_dict()
    assert Result.from_dict(data, "test") == result
    assert set(METRIC_KEYS) <= set(data["metrics"])
    assert result.metrics.effective_batch == 8  # from the config, whatever was passed
    assert result.metrics.mfu is None and data["metrics"]["mfu"] is None  # NaN is not JSON: stored as unknown
    assert data["schema"] == SCHEMA and len(result.id) == 32
    assert result.created_at.endswith("+00:00")


def test_failed_result_has_null_metrics_except_effective_batch():
    config = BenchConfig(device="cpu", batch=3, accum=2)
    result = Result.new(config, "oom", ENV, metrics=Metrics(effective_batch=6, samples_per_s=5.0),
                        samples={"step_ms": [1.0]}, error="boom")
    assert Result.from_dict(result.to_dict(), "test") == result
    data = result.to_dict()
    assert data["metrics"]["effective_batch"] == 6
    assert all(value is None for key, value in data["metrics"].items() if key != "effective_batch")
    assert result.samples is None


def test_every_status_has_the_same_metric_keys():
    ok = ok_result().to_dict()["metrics"]
    failed = Result.new(BenchConfig(device="cpu"), "timeout", ENV, error="late").to_dict()["metrics"]
    assert list(ok) == list(failed) == list(METRIC_KEYS)
    assert "grad_rel_diff" in failed and "allocator_retries" in failed


def test_v1_files_without_the_later_metric_keys_still_read():
    data = ok_dict()
    for key in ("grad_rel_diff", "allocator_retries"):
        del data["metrics"][key]
    assert Result.from_dict(data, "old").metrics.grad_rel_diff is None


def test_new_result_rejects_unknown_status():
    with pytest.raises(ValueError, match="status"):
        Result.new(BenchConfig(device="cpu"), "exploded", ENV)


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    MemoryError(),
    RuntimeError("CUDA out of memory"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"),
    RuntimeError("std::bad_alloc"),
])
def test_oom_kinds_classify_as_oom(exc):
    status, message = classify_exception(exc)
    assert status == "oom"
    assert message.startswith(type(exc).__name__)


@pytest.mark.parametrize("exc", [ValueError("bad shape"), RuntimeError("mat1 and mat2 shapes cannot be multiplied"), KeyError("x")])
def test_other_exceptions_classify_as_error(exc):
    status, message = classify_exception(exc)
    assert status == "error" and type(exc).__name__ in message


def test_jsonl_round_trip(tmp_path):
    results = [ok_result(batch=2), Result.new(BenchConfig(device="cpu"), "timeout", ENV, error="timed out")]
    path = tmp_path / "runs.jsonl"
    write_jsonl(path, results[:1])
    write_jsonl(path, results[1:])  # appends
    assert read_results(path) == results
    assert parse_results(dumps_jsonl(results), "text") == results
    write_jsonl(path, results[:1], append=False)
    assert len(read_results(path)) == 1


def test_appending_after_a_torn_line_drops_the_fragment_and_keeps_the_file_readable(tmp_path):
    from tests.hostile import torn

    runs = [ok_result(batch=b) for b in (1, 2, 3)]
    path = tmp_path / "runs.jsonl"
    path.write_bytes(torn(runs[:2]))  # two lines, then the start of the second again
    note = write_jsonl(path, runs[2:])
    assert note.startswith(f"{path}: dropped a torn last line (57 bytes")
    assert read_results(path) == runs and read_results(path).notes == ()
    # A complete last line that only lacks its newline is kept, and the next one starts anew.
    path.write_text(runs[0].to_json())
    assert write_jsonl(path, runs[1:2]) is None
    assert read_results(path) == runs[:2]


def test_a_failed_append_names_the_file_and_a_rewrite_leaves_no_temporary_file(tmp_path):
    with pytest.raises(OSError) as info:
        write_jsonl("/dev/full", [ok_result()])  # every write: no space left
    assert info.value.filename == "/dev/full" and "No space left" in info.value.strerror
    path = tmp_path / "runs.jsonl"
    write_jsonl(path, [ok_result()], append=False)
    assert [p.name for p in tmp_path.iterdir()] == ["runs.jsonl"]


def test_reader_accepts_a_json_list_and_one_pretty_object(tmp_path):
    result = ok_result()
    (tmp_path / "list.json").write_text(json.dumps([result.to_dict(), result.to_dict()]))
    (tmp_path / "one.json").write_text(json.dumps(result.to_dict(), indent=2))
    assert len(read_results(tmp_path / "list.json")) == 2
    assert read_results(tmp_path / "one.json") == [result]
    (tmp_path / "empty.jsonl").write_text("\n")
    assert read_results(tmp_path / "empty.jsonl") == []


def test_wrong_schema_version_names_file_line_and_version(tmp_path):
    path = tmp_path / "old.jsonl"
    path.write_text(json.dumps({**ok_dict(), "schema": "tradeoff-lab/result/v0"}) + "\n")
    with pytest.raises(ResultFormatError) as info:
        read_results(path)
    message = str(info.value)
    assert str(path) in message and "line 1" in message and "v0" in message and SCHEMA in message


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(ok_dict()) + "\n{\"schema\": \n")
    with pytest.raises(ResultFormatError, match=r"broken\.jsonl: line 2: not valid JSON"):
        read_results(path)


def test_not_utf8_is_a_format_error(tmp_path):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ResultFormatError, match="not UTF-8"):
        read_results(path)


@pytest.mark.parametrize("mutate, problem", [
    (lambda r: r.pop("metrics"), "missing key"),
    (lambda r: r.update(status="exploded"), "status 'exploded'"),
    (lambda r: r["metrics"].pop("step_ms"), "metrics is missing step_ms"),
    (lambda r: r["metrics"].update(step_ms=3.0), "metrics.step_ms must be an object"),
    (lambda r: r["config"].pop("batch"), "config is missing batch"),
    (lambda r: r.update(created_at="yesterday"), "not ISO-8601"),
    (lambda r: r.update(status="oom", error="x"), "must have null metrics"),
    (lambda r: r.update(status="error", error=None, metrics={k: None for k in METRIC_KEYS}), "needs an error message"),
    (lambda r: r.update(warnings="noisy"), "warnings must be a list"),
    (lambda r: r.update(origin="mine"), "origin 'mine' is not one of here, imported, demo"),
    (lambda r: r["env"].update(cpu_threads="two"), "env.cpu_threads"),
    (lambda r: r["env"].update(load_avg="high"), "env.load_avg"),
])
def test_invalid_results_say_what_is_wrong(mutate, problem):
    result = ok_dict()
    mutate(result)
    with pytest.raises(ResultFormatError) as info:
        Result.from_dict(result, "runs.jsonl: line 7")
    assert str(info.value).startswith("runs.jsonl: line 7: ")
    assert problem in str(info.value)


def test_non_object_line_is_rejected():
    with pytest.raises(ResultFormatError, match="line 1: expected a result object, got int"):
        parse_results("3\n", "numbers.jsonl")


def test_origin_and_fingerprint_survive_the_round_trip_and_old_files_read_as_measured_here():
    data = ok_dict()
    data["env"].update(host_id="abc", cpu_threads=8, load_avg=1.5, alloc_conf="PYTORCH_ALLOC_CONF=expandable_segments:True")
    result = Result.from_dict({**data, "origin": "imported"}, "t")
    assert (result.origin, result.env.cpu_threads, result.env.load_avg) == ("imported", 8, 1.5)
    assert Result.from_dict(result.to_dict(), "t") == result
    data.pop("origin", None)
    assert Result.from_dict(data, "t").origin == "here"  # files written before origins were recorded
