"""``python -m engine``: bad input is one stderr line and exit 2; runs go through the worker."""
import json
import os
import subprocess
import sys

import pytest

from engine import cli
from engine.config import FIELD_NAMES, SCALAR_FIELDS
from engine.results import Result, read_results
from engine.store import Store
from tests.conftest import ROOT
from tests.test_results import ok_dict
TINY = ["--model", "gpt-tiny", "--set", "n_layers=2", "--set", "seq_len=32", "--set", "d_model=64",
        "--set", "n_heads=2", "--set", "vocab=256", "--warmup", "1", "--steps", "2", "--device", "cpu"]


@pytest.fixture
def env():
    # The test's own device queue and database (conftest), so these runs never wait behind
    # other benchmarks here.
    return {**os.environ, "PYTHONPATH": ROOT}


def _start(args, env):
    return subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.fixture
def bad_files(tmp_path):
    good = json.dumps(ok_dict())
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text(good + "\nthis is not json\n")
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({**ok_dict(), "schema": "tradeoff-lab/result/v0"}) + "\n")
    not_db = tmp_path / "not.sqlite"
    not_db.write_text("plain text, not SQLite\n" * 50)
    return {"malformed": malformed, "old": old, "not_db": not_db}


def test_bad_input_exits_2_with_one_stderr_line(env, bad_files):
    cases = [
        (["run", "--batch", "0"], "batch: invalid value 0"),
        (["run", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        ([], "the following arguments are required: COMMAND"),
        (["show", str(bad_files["malformed"])], "malformed.jsonl: line 2: not valid JSON"),
    ]
    # Started together: each process spends most of its time importing torch.
    procs = [(_start(args, env), args, phrase) for args, phrase in cases]
    for proc, args, phrase in procs:
        code, out, err = _finish(proc)
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and "Traceback" not in err, (args, err)
        assert phrase in err, (args, err)
        assert out == ""


BAD_INPUT = [
    (["run", "--batch", "two"], "batch: invalid value 'two'; allowed: an integer"),
    (["run", "--accum", "-1", "--device", "cpu"], "accum: invalid value -1"),
    (["run", "--precision", "fp8", "--device", "cpu"], "precision: invalid value 'fp8'; allowed: fp32, fp16, bf16"),
    (["run", "--ckpt", "most", "--device", "cpu"], "ckpt: invalid value 'most'"),
    (["run", "--optimizer", "lion", "--device", "cpu"], "optimizer: invalid value 'lion'"),
    (["run", "--device", "tpu"], "device: invalid value 'tpu'"),
    (["run", "--model", "nosuch_mod:build", "--device", "cpu"], "ModuleNotFoundError"),
    (["run", "--model", "tests.helper_models:returns_wrong_types", "--device", "cpu"], "model: invalid value"),
    (["run", "--set", "seq_len", "--device", "cpu"], "--set: invalid value 'seq_len'; allowed: KEY=VALUE"),
    (["run", "--set", "wings=2", "--device", "cpu"], "overrides.wings: invalid value 2"),
    (["run", "--memory-cap-gib", "lots", "--device", "cpu"], "memory_cap_gib: invalid value 'lots'"),
    (["run", "--timeout", "0", "--device", "cpu"], "timeout_s: invalid value 0.0"),
    (["sweep", "--batch", "1,x", "--device", "cpu"], "batch: invalid value 'x'"),
    (["sweep", "--batch", "3,5", "--effective-batch", "8", "--device", "cpu"],
     "nothing to run: batch 3 skipped: does not divide effective batch 8; batch 5 skipped"),
    (["sweep", "--accum", "1,2", "--effective-batch", "8", "--device", "cpu"], "accum: invalid value [1, 2]"),
    (["sweep", "--effective-batch", "many", "--device", "cpu"], "effective_batch: invalid value 'many'"),
    (["run", "--set", "seq_len=16,32", "--device", "cpu"],
     "overrides.seq_len: invalid value '16,32'; allowed: one integer here; a comma list is a sweep: "
     "python -m engine sweep --set seq_len=16,32"),
    (["sweep", "--set", "seq_len=16,x", "--device", "cpu"], "overrides.seq_len: invalid value 'x'; allowed: an integer"),
    (["sweep", "--set", "seq_len=16,0", "--device", "cpu"], "overrides.seq_len: invalid value 0; allowed: an integer"),
    (["sweep", "--set", "wings=1,2", "--device", "cpu"], "overrides.wings: invalid value 1; allowed: a dimension of gpt-tiny: seq_len"),
    (["sweep", "--set", "seq_len=8", "--set", "seq_len=16,32", "--device", "cpu"],
     "--set: invalid value 'seq_len=16,32'; allowed: each key once"),
    (["show", "/no/such/results.jsonl"], "/no/such/results.jsonl: No such file or directory"),
    (["show", "{old}"], "old.jsonl: line 1: unsupported schema 'tradeoff-lab/result/v0'"),
    (["run", "--device", "cpu", "--db", "{not_db}"], "not.sqlite: cannot open the results database"),
]


@pytest.mark.parametrize("args, phrase", BAD_INPUT)
def test_more_bad_input_in_process(args, phrase, bad_files, capsys):
    args = [arg.format(**bad_files) for arg in args]
    assert cli.main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and phrase in captured.err, captured.err
    assert captured.out == ""


@pytest.mark.parametrize("command", ["run", "sweep", "find-batch", "predict", "timeline", "pitfall"])
def test_the_config_flags_are_exactly_the_config_fields(command):
    parser = cli.build_parser()
    subparser = parser._subparsers._group_actions[0].choices[command]
    config_dests = {a.dest for a in subparser._actions if a.dest in FIELD_NAMES or a.option_strings[:1] == ["--set"]}
    assert config_dests == set(FIELD_NAMES)
    flags = {a.option_strings[0] for a in subparser._actions if a.dest in FIELD_NAMES}
    assert flags == {f.flag for f in SCALAR_FIELDS} | {"--set"}


def test_run_stores_writes_and_prints_json(env, tmp_path):
    out, db = tmp_path / "runs.jsonl", tmp_path / "runs.sqlite"
    code, stdout, stderr = _finish(_start(["run", *TINY, "--batch", "2", "--json", "--out", str(out), "--db", str(db)], env))
    assert code == 0, stderr
    [line] = stdout.splitlines()  # only the result on stdout; progress went to stderr
    result = Result.from_dict(json.loads(line), "stdout")
    assert result.status == "ok" and result.config.batch == 2
    assert "measuring step" in stderr
    assert read_results(out) == [result]
    assert Store(db).get(result.id) == result


def test_a_failed_run_is_a_result_with_exit_code_1(capsys):
    assert cli.main(["run", "--model", "tests.helper_models:exits", "--device", "cpu", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"] == "worker died: exit code 3"


def _sweep_configs(argv: list[str]):
    """The configs ``python -m engine sweep ARGV`` would run, without running them."""
    from engine.cli.common import grid_from_args
    from engine.sweep import expand

    args = cli.build_parser().parse_args(["sweep", *argv])
    return expand(*grid_from_args(args), int(args.effective_batch) if args.effective_batch else None)


def test_each_set_list_is_a_sweep_axis_crossed_with_the_other_lists():
    configs, _ = _sweep_configs(["--set", "seq_len=16,32", "--set", "n_layers=1,2", "--set", "d_model=96",
                                 "--device", "cpu"])
    assert sorted((c.overrides["seq_len"], c.overrides["n_layers"]) for c in configs) == [
        (16, 1), (16, 2), (32, 1), (32, 2)]
    assert all(c.overrides["d_model"] == 96 for c in configs)
    configs, notes = _sweep_configs(["--set", "seq_len=16,32", "--batch", "1,2,3", "--precision", "fp32,bf16",
                                     "--effective-batch", "4", "--device", "cpu"])
    assert len(configs) == 2 * 2 * 2 and notes == ["batch 3 skipped: does not divide effective batch 4"]
    assert {(c.overrides["seq_len"], c.batch * c.accum) for c in configs} == {(16, 4), (32, 4)}


def test_a_sweep_over_model_dimensions_stores_each_runs_dimensions(tmp_path, capsys):
    out = tmp_path / "dims.jsonl"
    tiny = ["--model", "gpt-tiny", "--set", "n_layers=1", "--set", "d_model=32", "--set", "n_heads=2",
            "--set", "vocab=64", "--batch", "1", "--warmup", "0", "--steps", "1", "--device", "cpu"]
    assert cli.main(["sweep", *tiny, "--set", "seq_len=8,16", "--out", str(out)]) == 0
    results = read_results(out)
    assert [(r.status, r.config.overrides) for r in results] == [
        ("ok", {"n_layers": 1, "d_model": 32, "n_heads": 2, "vocab": 64, "seq_len": t}) for t in (8, 16)]
    assert len({r.sweep_id for r in results}) == 1
    # tokens per step follow the swept sequence length
    assert [round(r.metrics.tokens_per_s / r.metrics.samples_per_s) for r in results] == [8, 16]
    table = capsys.readouterr().out
    assert "d_model=32,n_heads=2,n_layers=1,seq_len=8,vocab=64" in table  # the rows say what differs


def test_sweep_with_effective_batch_then_show(tmp_path, capsys):
    out = tmp_path / "sweep.jsonl"
    assert cli.main(["sweep", *TINY, "--batch", "1,3", "--effective-batch", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "note: batch 3 skipped: does not divide effective batch 2" in captured.err
    [result] = read_results(out)
    assert (result.config.batch, result.config.accum, result.status) == (1, 2, "ok")
    assert result.id[:8] in captured.out  # the closing table

    assert cli.main(["show", str(out)]) == 0
    header, rule, row = capsys.readouterr().out.splitlines()
    assert header.split()[:3] == ["id", "status", "model"]
    assert row.split()[:3] == [result.id[:8], "ok", "gpt-tiny"]
    spread = header.index("spread")  # the step time's spread, so a noisy run is not read as a steady one
    assert row[spread:].startswith(f"±{result.metrics.step_ms.iqr_rel:.0%}")
    assert ("noisy" in row[spread:].split()[0:2]) == result.metrics.step_ms.noisy


def test_a_sweep_at_one_effective_batch_says_up_front_when_batch_norm_makes_runs_differ(tmp_path, capsys):
    cnn = ["--model", "cnn", "--set", "image_size=8", "--set", "width=8", "--set", "depth=1", "--device", "cpu",
           "--warmup", "1", "--steps", "1"]
    assert cli.main(["sweep", *cnn, "--batch", "1,2", "--effective-batch", "2", "--out", str(tmp_path / "r.jsonl")]) == 0
    err = capsys.readouterr().err
    [note] = [line for line in err.splitlines() if line.startswith("note: cnn:")]
    assert "BatchNorm" in note and "each of the 2 micro-batches is normalised on its own" in note
    assert cli.main(["sweep", *TINY, "--batch", "1,2", "--effective-batch", "2", "--out", str(tmp_path / "g.jsonl")]) == 0
    assert "BatchNorm" not in capsys.readouterr().err  # GPT has none


def test_devices_says_what_is_there(capsys):
    assert cli.main(["devices"]) == 0
    out = capsys.readouterr().out
    assert "Benchmarks with --device auto run on:" in out
    if "run on: cpu" in out:
        assert "NVIDIA" in out  # says plainly why there is no GPU


def test_show_and_recommend_start_without_torch(tmp_path):
    path = tmp_path / "runs.jsonl"
    path.write_text(json.dumps(ok_dict(batch=2)) + "\n")
    code = ("import sys; from engine import cli; "
            f"cli.main(['show', {str(path)!r}]); "
            f"cli.main(['recommend', '--results', {str(path)!r}, '--effective-batch', '2', '--memory-budget-gib', '1']); "
            "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "no torch", out.stdout + out.stderr
    assert "Best: batch 2" in out.stdout


def test_show_empty_file(tmp_path, capsys):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    assert cli.main(["show", str(path)]) == 0
    assert "no results" in capsys.readouterr().out
