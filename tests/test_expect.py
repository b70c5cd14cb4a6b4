"""What a run will cost before it starts: analytic peak and expected duration, with their basis."""
import pytest

from engine import expect
from engine.config import GIB, BenchConfig
from tests.factories import H100_ENV, TEST_HOST, make_result


def test_duration_comes_from_the_same_configuration_measured_here_scaled_by_batch():
    measured = make_result(batch=4)  # step 4*(2+4)+1.5 = 25.5 ms
    config = BenchConfig(model="gpt-tiny", device="cpu", batch=8, warmup=2, steps=10)
    seconds, basis = expect.expected_seconds(config, [measured], TEST_HOST)
    assert seconds == pytest.approx((2 + 10 + expect.EXTRA_STEPS) * 0.0255 * 2)
    assert "at batch 4 measured here" in basis


def test_runs_from_another_machine_or_device_are_not_this_machines():
    config = BenchConfig(model="gpt-tiny", device="cpu", batch=8)
    elsewhere = make_result(batch=8).replace(origin="imported")
    gpu = make_result(batch=8, env=H100_ENV)
    seconds, basis = expect.expected_seconds(config, [elsewhere, gpu], TEST_HOST)
    assert seconds is None and "no run measured on this cpu here" in basis


def test_another_model_is_extrapolated_by_flops_at_the_rate_measured_here():
    measured = make_result(batch=4)  # 5.2 GFLOP in 25.5 ms
    rate = 1.3e9 * 4 / 0.0255
    config = BenchConfig(model="gpt-small", device="cpu", batch=1, warmup=1, steps=2)
    seconds, basis = expect.expected_seconds(config, [measured], TEST_HOST)
    flops = expect.analytic_flops_per_step(config)
    # gpt-small: 124.5 M parameters, 12 layers, d_model 768, 1024 tokens.
    assert flops == pytest.approx((6 * 124_475_904 + 12 * 12 * 768 * 1024) * 1024, rel=0.01)
    assert seconds == pytest.approx((1 + 2 + expect.EXTRA_STEPS) * flops / rate)
    assert "by FLOPs" in basis and "1 run(s) measured here" in basis


def test_a_model_that_will_not_fit_or_takes_long_is_warned_about_before_it_starts():
    config = BenchConfig(model="gpt-xl", device="cpu", batch=8)
    big = expect.Expectation(60 * GIB, "about", 23.5 * GIB, 3600.0, "by FLOPs")
    assert big.fits is False
    [memory, duration] = big.warnings()
    assert "not fit" in memory and "60 GiB" in memory and "23.5 GiB" in memory
    assert "about 60 min" in duration
    real = expect.expect(config, [], TEST_HOST)
    assert real.peak_bytes > 10 * GIB and real.seconds is None and real.words().startswith("Expected: peak about ")
    assert "duration unknown" in real.words()
