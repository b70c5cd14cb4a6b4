"""``python -m engine selfcheck``: the tool checks itself on this machine (the GPU checks skip here)."""
import json

import pytest

from engine import cli, selfcheck
from engine.results import Metrics, Result
from engine.stats import Summary
from tests.factories import CPU_ENV


def test_selfcheck_on_this_cpu_passes_every_check_it_can_run(capsys):
    assert cli.main(["selfcheck", "--device", "cpu", "--json"]) == 0
    checks = json.loads(capsys.readouterr().out)["checks"]
    assert [c["name"] for c in checks][:2] == ["timing attribution", "timing illusion"]
    assert {c["status"] for c in checks} <= {"pass", "skip"} and len(checks) == 8
    assert all(set(c) == {"name", "status", "expected", "measured", "reason"} for c in checks)
    skipped = {c["name"]: c["reason"] for c in checks if c["status"] == "skip"}
    assert set(skipped) == {"timing illusion", "peak FLOPs for MFU"} and all(skipped.values())


def _result_with(forward_ms: float, backward_ms: float) -> Result:
    config = selfcheck.BenchConfig(device="cpu")
    metrics = Metrics(effective_batch=8, forward_ms=Summary(forward_ms, 0, 0, 0), backward_ms=Summary(backward_ms, 0, 0, 0),
                      step_ms=Summary(1, 0, 0, 0), optimizer_ms=Summary(1, 0, 0, 0))
    return Result.new(config, "ok", CPU_ENV, metrics=metrics, samples={})


@pytest.mark.parametrize("forward, backward, status", [(0.3, 50.4, "pass"), (50.4, 0.3, "fail"), (0.3, 10.0, "fail")])
def test_attribution_fails_when_the_time_lands_in_the_wrong_phase(monkeypatch, forward, backward, status):
    monkeypatch.setattr(selfcheck, "run", lambda config: _result_with(forward, backward))
    assert selfcheck._attribution(selfcheck.BenchConfig(device="cpu"), gpu=False).status == status


def test_a_check_whose_run_fails_is_a_failure_with_the_reason_and_the_rest_still_run(monkeypatch):
    failed = Result.new(selfcheck.BenchConfig(device="cpu"), "error", CPU_ENV, error="worker died: exit code 3")
    monkeypatch.setattr(selfcheck, "run", lambda config: failed)
    monkeypatch.setattr(selfcheck, "CHECKS", (selfcheck._attribution, selfcheck._illusion))
    checks = selfcheck.run_selfcheck("cpu")
    assert [(c.status, c.reason) for c in checks] == [
        ("fail", "the benchmark failed: error: worker died: exit code 3"),
        ("skip", "needs a GPU: a CPU has no asynchrony to hide")]
