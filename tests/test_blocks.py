"""Checkpointing reaches every block of models nobody here designed, records what it wrapped,
and BatchNorm is handled: running statistics once per micro-batch, a warning with accumulation."""
import pytest
import torch

from engine import BenchConfig, memory, models
from engine.measure import run_benchmark
from engine.step import build_step

RESNET50 = "tests.external_models:build_resnet50"
RESNET18 = "tests.external_models:build_resnet18"


def _activations(**fields) -> int:
    step = build_step(BenchConfig(device="cpu", batch=4, optimizer="sgd", **fields))
    step.run()
    return memory.memory_breakdown(step).activations


def test_full_checkpointing_wraps_every_block_of_every_stage():
    step = build_step(BenchConfig(model=RESNET50, device="cpu", batch=2, ckpt="full"))
    c = step.checkpointed
    assert (c.wrapped, c.found, c.classes) == (16, 16, ("Bottleneck",))  # stages of 3, 4, 6 and 3
    assert c.paths[:4] == ("layer1.0", "layer1.1", "layer1.2", "layer2.0") and c.paths[-1] == "layer4.2"
    assert c.param_share > 0.95 and c.warning() is None


def test_full_checkpointing_of_a_staged_resnet_keeps_well_under_half_the_activations():
    # Stages of 3, 4, 6 and 3 blocks: wrapping only the longest stage (the old rule) kept most.
    none, full = _activations(model=RESNET50, ckpt="none"), _activations(model=RESNET50, ckpt="full")
    assert full < 0.5 * none


def test_every_k_counts_blocks_across_stages():
    c = build_step(BenchConfig(model=RESNET18, device="cpu", batch=2, ckpt="every-k", k=3)).checkpointed
    assert c.paths == ("layer1.0", "layer2.1", "layer4.0")  # blocks 0, 3, 6 of the 8


def test_named_blocks_and_a_warning_when_they_hold_few_parameters():
    result = run_benchmark(BenchConfig(model=RESNET18, device="cpu", batch=2, warmup=1, steps=1, ckpt="full",
                                       blocks="layer1.*"))
    c = result.checkpointed
    assert c.wrapped == 2 and c.source == "--blocks layer1.*" and c.param_share < 0.1
    assert any("holding" in w and "--blocks" in w for w in result.warnings)
    assert result.to_dict()["checkpointed"]["paths"] == ["layer1.0", "layer1.1"]


def test_the_automatic_choice_on_a_model_without_a_blocks_attribute():
    model, _ = models.build(RESNET18)
    blocks = models.find_blocks(model)
    assert blocks.source.startswith("found") and len(blocks.paths) == 8 and blocks.classes == ["BasicBlock"]
    assert models.find_blocks(models.build("gpt-tiny")[0]).source == "model.blocks"


def test_batch_norm_running_statistics_are_updated_once_per_micro_batch_under_checkpointing():
    counts = {}
    for ckpt in ("none", "full"):
        step = build_step(BenchConfig(model=RESNET18, device="cpu", batch=2, accum=2, ckpt=ckpt))
        step.run()
        bn = step.model.layer1[0].block.bn1 if ckpt == "full" else step.model.layer1[0].bn1
        counts[ckpt] = int(bn.num_batches_tracked)
    assert counts == {"none": 2, "full": 2}  # not 4: the recompute does not update them again


def test_checkpointing_a_batch_norm_model_keeps_its_gradients():
    def grads(ckpt):
        step = build_step(BenchConfig(model=RESNET18, device="cpu", batch=2, ckpt=ckpt))
        loss = step.model(*step.batches[0])
        loss.backward()
        return [p.grad.clone() for p in step.model.parameters()]

    for a, b in zip(grads("none"), grads("full")):
        torch.testing.assert_close(a, b)


def test_accumulation_with_batch_norm_says_it_is_not_a_bigger_batch():
    result = run_benchmark(BenchConfig(model="cnn", overrides={"image_size": 8, "width": 8, "depth": 1}, device="cpu",
                                       batch=2, accum=2, warmup=1, steps=1))
    assert any("BatchNorm" in w and "accumulation does not give the gradients" in w for w in result.warnings)
    single = run_benchmark(BenchConfig(model="cnn", overrides={"image_size": 8, "width": 8, "depth": 1}, device="cpu",
                                       batch=4, accum=1, warmup=1, steps=1))
    assert not any("BatchNorm" in w for w in single.warnings)


@pytest.mark.parametrize("blocks", ["rm -rf /", "", "a;b", "x" * 600])
def test_bad_block_patterns_are_config_errors(blocks):
    from engine import ConfigError

    with pytest.raises(ConfigError) as info:
        BenchConfig(blocks=blocks)
    assert info.value.field == "blocks"
