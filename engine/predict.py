"""Memory prediction: a linear fit of measured peaks and an analytic estimate.

Two independent answers to "what is the largest micro-batch that fits in N GiB?":

* **Fitted** — peak allocated memory of one configuration measured at 2-3 micro-batch
  sizes, fitted as ``peak ≈ fixed + slope × batch`` (least squares). ``fixed`` is what does
  not depend on the batch (weights, gradients, optimizer state, autocast weight copies),
  ``slope`` the bytes per sample (activations, logits). Extrapolating a straight line is
  what makes it cheap; the allocator's rounding and fragmentation are why a margin is kept.
* **Analytic** — nothing is run: parameters, gradients and optimizer state are counted
  exactly from the model (built on the meta device, so even gpt-xl costs no memory) and
  the optimizer, and for the GPT presets and the ``hf:`` transformers (GPT-2, Llama, Qwen2,
  Mistral) the activations come from the per-layer formula of
  Korthikanti et al. 2022, adapted below to this model.

Both are compared with measurements wherever one exists (``comparison_rows``).
"""
from __future__ import annotations

import functools
import math
import uuid
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

from . import hf_table, presets
from .config import GIB, BenchConfig, optimizer_impl_for
from .devices import resolve_device
from .results import Result

DEFAULT_MARGIN = 0.05
DEFAULT_CAPACITIES_GIB = (24.0, 40.0, 80.0, 141.0)
# Config fields that change how a run is measured, not what it allocates: runs that differ
# only in these (and in the batch) are points of one memory curve.
# The device is matched separately, by the device type the run reports.
_MEASUREMENT_ONLY = ("batch", "warmup", "steps", "seed", "timeout_s", "device", "memory_cap_gib")


def usable_bytes(capacity_bytes: float, margin: float = DEFAULT_MARGIN) -> float:
    """Bytes a run may use on a device of ``capacity_bytes`` with ``margin`` (a fraction) left free."""
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be a fraction in [0, 1), got {margin!r}")
    return capacity_bytes * (1.0 - margin)


def _largest_batch(peak_of, budget_bytes: float, limit: int) -> int:
    """Largest batch in [1, limit] with ``peak_of(batch) <= budget_bytes`` for a
    non-decreasing ``peak_of``; 0 when even batch 1 does not fit (binary search)."""
    if peak_of(1) > budget_bytes:
        return 0
    lo, hi = 1, limit  # invariant: lo fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if peak_of(mid) <= budget_bytes:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ------------------------------------------------------------------------- fitted
@dataclass(frozen=True)
class PeakFit:
    """``peak ≈ fixed_bytes + slope_bytes × batch`` fitted to measured (batch, peak) points."""

    fixed_bytes: float
    slope_bytes: float
    points: tuple[tuple[int, float], ...]

    def predict(self, batch: int) -> float:
        """Fitted peak bytes at micro-batch ``batch``."""
        return self.fixed_bytes + self.slope_bytes * batch

    def max_batch(self, capacity_bytes: float, margin: float = DEFAULT_MARGIN, limit: int = 1 << 30) -> int:
        """Largest micro-batch whose fitted peak leaves ``margin`` of ``capacity_bytes`` free.

        0 when batch 1 already does not fit; ``limit`` when the fit does not grow with the
        batch (a slope <= 0 means the points say nothing about where it stops).
        """
        budget = usable_bytes(capacity_bytes, margin)
        if self.slope_bytes <= 0:
            return limit if self.predict(1) <= budget else 0
        return max(0, min(limit, int((budget - self.fixed_bytes) // self.slope_bytes)))

    @property
    def max_error(self) -> float:
        """The largest relative miss of the line at its own points (its quality)."""
        return max(abs(self.predict(b) - p) / p for b, p in self.points if p)

    def to_dict(self) -> dict:
        return {
            "fixed_bytes": self.fixed_bytes,
            "slope_bytes": self.slope_bytes,
            "points": [list(p) for p in self.points],
            "max_error": self.max_error,
        }


# A point counts as on the rising part of the curve when its peak is at least this much
# above the previous (smaller) batch's.
GROWTH = 0.01


def growing_points(points: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    """The points on the part of the curve that grows with the batch.

    The peak is the larger of a part that does not depend on the batch (weights, gradients,
    optimizer state: the optimizer step's peak) and one that grows with it (activations): at
    small batches the flat part can set the peak, and a line through those points would
    have too low a slope. A point whose peak rose by at least GROWTH over the next smaller
    batch's is above the flat part, so on the growing line; kept: the trailing run of them.
    """
    pts = sorted((int(b), float(p)) for b, p in points)
    rising: list[tuple[int, float]] = []
    for before, point in zip(pts, pts[1:]):
        rising = rising + [point] if point[1] >= before[1] * (1 + GROWTH) else []
    return rising


def next_batch_to_measure(points: Iterable[tuple[int, float]], limit: int) -> int | None:
    """The next micro-batch to measure for a fit that shows the slope: 1 first, then doubling
    until two measured peaks grow with the batch (None when they do, or past ``limit``)."""
    pts = sorted(points)
    if len(growing_points(pts)) >= 2:
        return None
    batch = 2 * pts[-1][0] if pts else 1
    return batch if batch <= limit else None


def fit_peak(points: Iterable[tuple[int, float]]) -> PeakFit:
    """Least-squares line through (batch, peak bytes) points; needs two distinct batches."""
    pts = tuple(sorted((int(b), float(p)) for b, p in points))
    batches = {b for b, _ in pts}
    if len(batches) < 2:
        raise ValueError(f"a fit needs measured peaks at two or more different batch sizes, got {sorted(batches)}")
    n = len(pts)
    mean_b = sum(b for b, _ in pts) / n
    mean_p = sum(p for _, p in pts) / n
    sxx = sum((b - mean_b) ** 2 for b, _ in pts)
    sxy = sum((b - mean_b) * (p - mean_p) for b, p in pts)
    slope = sxy / sxx
    return PeakFit(fixed_bytes=mean_p - slope * mean_b, slope_bytes=slope, points=pts)


def curve_key(config: dict) -> tuple:
    """What identifies one memory-vs-batch curve: every config field except those in
    ``_MEASUREMENT_ONLY`` (a sorted tuple so it can be a dict key)."""
    return tuple(sorted((k, repr(v)) for k, v in config.items() if k not in _MEASUREMENT_ONLY))


def measured_points(results: Iterable[Result], config: BenchConfig, device_type: str,
                    host_id: str) -> list[tuple[int, float, Result]]:
    """(batch, peak allocated bytes, result) of the ok results on ``config``'s memory curve
    measured on this machine (``host_id``) on a ``device_type`` device ("cpu", "cuda"), in
    one environment (the newest run's: a fit never mixes machines or software versions),
    newest result per batch (``results`` are assumed newest first, as the store lists them)."""
    key = curve_key(config.to_dict())
    points: dict[int, tuple[int, float, Result]] = {}
    environment = None
    for result in results:
        peak = result.metrics.peak_allocated_bytes
        if not result.ok or peak is None or result.env.device_type != device_type or result.origin != "here" \
                or result.env.host_id != host_id or curve_key(result.config.to_dict()) != key:
            continue
        environment = environment or result.environment_id
        if result.environment_id == environment:
            points.setdefault(result.config.batch, (result.config.batch, float(peak), result))
    return sorted(points.values(), key=lambda p: p[0])


def missing_configs(config: BenchConfig, points: Iterable[tuple[int, float]], wanted: Iterable[int]) -> list[BenchConfig]:
    """``config`` at each wanted micro-batch that has no measured point yet (to run for a fit)."""
    measured = {batch for batch, *_ in points}
    return [config.replace(batch=batch) for batch in dict.fromkeys(wanted) if batch not in measured]


def measure_for_fit(config: BenchConfig, points: Iterable[tuple[int, float]], wanted: Iterable[int] | None = None,
                    limit: int = 1024, progress=None, on_result=None, cancel=None) -> tuple[list[tuple[int, float]], str | None]:
    """Measure what a fit of ``config``'s memory curve needs, in the worker, and return every
    (batch, peak) point with a note when measuring stopped early.

    ``wanted``: the batches the user asked for (those not measured yet run); None: the
    batches ``next_batch_to_measure`` picks, doubling from 1 until the peak grows. Each run
    goes to ``on_result`` (to be stored); progress events carry the trial and its batch; a
    failed run (out of memory, past ``limit``...) ends the measuring.
    """
    from .worker import run

    points = sorted((int(b), float(p)) for b, p in points)
    sweep_id = uuid.uuid4().hex
    queue = [c.batch for c in missing_configs(config, points, wanted)] if wanted is not None else None
    trial = 0
    while True:
        batch = (queue.pop(0) if queue else None) if queue is not None else next_batch_to_measure(points, limit)
        if batch is None or (cancel is not None and cancel.is_set()):
            return points, None
        trial += 1
        forward = (lambda event, n=trial, b=batch: progress(event.within(trial=n, batch=b))) if progress else None
        result = run(config.replace(batch=batch), forward, cancel, sweep_id)
        if on_result is not None:
            on_result(result)
        if not result.ok:
            return points, f"batch {batch}: {result.status}: {result.error}; measuring stopped there"
        points = sorted(points + [(batch, float(result.metrics.peak_allocated_bytes))])


# ------------------------------------------------------------------------- analytic
# Bytes per element of the tensors autocast produces, and of fp32 master weights.
_FP32 = 4
_COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_INDEX = 8  # int64 token ids / targets


@dataclass(frozen=True)
class AnalyticEstimate:
    """Memory of one configuration computed without running it (bytes).

    ``params``/``grads``/``optimizer`` are exact. ``inputs`` are the synthetic batches
    (all ``accum`` micro-batches are made up front). ``activations`` are the tensors the
    forward pass leaves alive for backward (blocks, head, log-probabilities, autocast's
    low-precision weight copies), the figure engine/memory.py reports as "activations".
    ``transient`` is the most that backward adds on top at one time (the loss gradients at
    its start, or one recomputed block). ``peak`` is the larger of the backward and
    optimizer-step totals. Activation fields are None for models without a formula
    (everything but the GPT presets and the ``hf:`` architectures).

    A data-parallel run's figures are one rank's: ``params``/``grads``/``optimizer`` are its
    share (all of them with DDP, 1/N with FSDP), and ``data_parallel`` is what the wrapper
    adds for the whole step (DDP's gradient buckets; FSDP's largest gathered unit, or every
    unit without resharding after forward).
    """

    params: int
    grads: int
    optimizer: int
    inputs: int | None
    activations: int | None
    transient: int | None
    peak: int | None
    notes: tuple[str, ...] = field(default=())
    data_parallel: int = 0

    def peak_bound(self) -> tuple[int, str]:
        """(bytes, "about") from the full estimate, else (bytes, "at least") from what is exact
        for every model: parameters, gradients and optimizer state (and what data parallelism
        keeps beside them), a lower bound of the peak."""
        if self.peak is not None:
            return self.peak, "about"
        return self.params + self.grads + self.optimizer + self.data_parallel, "at least"

    def to_dict(self) -> dict:
        return asdict(self) | {"notes": list(self.notes)}


@dataclass(frozen=True)
class _ModelFacts:
    n_params: int
    n_param_tensors: int
    param_shapes: tuple[tuple[int, ...], ...]  # of each parameter tensor, tied ones once
    # Weights autocast casts to the compute dtype (Linear/Conv), tied ones once: those in
    # one repeated block and those outside the blocks (the tied lm_head for GPT).
    cast_elems_per_block: int
    cast_elems_outside: int
    batch_norm_layers: tuple[str, ...]
    # FSDP's units are the blocks and the root (everything outside them): the most
    # parameters one unit gathers at a time.
    largest_unit_params: int = 0


def _model_facts(config: BenchConfig) -> _ModelFacts | None:
    return _model_facts_cached(config.model, tuple(sorted(config.overrides.items())))


def _casts_weight(module) -> bool:
    """Whether autocast casts ``module``'s weight: Linear and Conv2d, and transformers' Conv1D
    (GPT-2's projections: a Linear with the weight transposed, run by addmm)."""
    import torch

    return isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or type(module).__name__ == "Conv1D"


@functools.lru_cache(maxsize=64)
def _model_facts_cached(model_name: str, overrides: tuple) -> _ModelFacts | None:
    """Parameter facts from the model built on the meta device (no memory, any size);
    cached because the batch searches below ask for the same model many times."""
    import torch

    from . import models

    try:
        with torch.device("meta"):
            model, _ = models.build(model_name, dict(overrides))
    except Exception:  # a user model that cannot be built on meta: no analytic estimate
        return None

    def cast_weights(modules) -> dict[int, int]:
        return {
            id(m.weight): m.weight.numel()
            for module in modules
            for m in module.modules()
            if _casts_weight(m) and m.weight.requires_grad
        }

    params = {id(p): p for p in model.parameters()}
    blocks = models.find_blocks(model)
    in_blocks = cast_weights(blocks.modules) if blocks is not None else {}
    outside = {key: n for key, n in cast_weights([model]).items() if key not in in_blocks}
    n_blocks = len(blocks.paths) if blocks is not None else 0
    block_params = [sum(p.numel() for p in module.parameters()) for module in (blocks.modules if blocks else ())]
    n_params = sum(p.numel() for p in params.values())
    return _ModelFacts(
        n_params=sum(p.numel() for p in params.values()),
        n_param_tensors=len(params),
        param_shapes=tuple(tuple(p.shape) for p in params.values()),
        cast_elems_per_block=sum(in_blocks.values()) // max(1, n_blocks),
        cast_elems_outside=sum(outside.values()),
        batch_norm_layers=tuple(models.batch_norm_layers(model)),
        largest_unit_params=max(block_params + [n_params - sum(block_params)]),
    )


def model_param_count(config: BenchConfig) -> int | None:
    """Parameters of ``config``'s model (built on the meta device); None if it cannot be built there."""
    facts = _model_facts(config)
    return None if facts is None else facts.n_params


def batch_norm_layers(config: BenchConfig) -> tuple[str, ...] | None:
    """The model's BatchNorm layers, from its meta build (None when it cannot be built there)."""
    facts = _model_facts(config)
    return None if facts is None else facts.batch_norm_layers


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def adafactor_state_elems(shape: tuple[int, ...]) -> int:
    """Elements of torch.optim.Adafactor's second-moment state for a parameter of ``shape``
    (torch/optim/_adafactor.py): for two or more dimensions a row factor (the shape with the
    last dimension 1) and a column factor (the second-to-last 1), else a full-size variance."""
    if len(shape) < 2:
        return _numel(shape)
    return _numel(shape) // shape[-1] + _numel(shape) // shape[-2]


def optimizer_state_bytes(optimizer: str, param_shapes: Sequence[tuple[int, ...]], device_type: str = "cpu",
                          impl: str = "auto") -> int:
    """Device memory of the optimizer state as engine/step.py builds the optimizer (fp32
    parameters of ``param_shapes``) on ``device_type`` in implementation ``impl``.

    AdamW keeps exp_avg and exp_avg_sq (one fp32 element each per parameter); SGD one fp32
    momentum buffer per parameter; Adafactor its factored second moments
    (``adafactor_state_elems``). AdamW and Adafactor also keep a 4-byte ``step`` per
    parameter tensor, which torch holds on the host unless the step is fused: on the device
    it counts only on the CPU or for fused AdamW.
    """
    n_params = sum(_numel(shape) for shape in param_shapes)
    steps_on_device = device_type == "cpu" or optimizer_impl_for(optimizer, impl, device_type) == "fused"
    step_bytes = _FP32 * len(param_shapes) if steps_on_device else 0
    if optimizer == "adamw":
        return 2 * _FP32 * n_params + step_bytes
    if optimizer == "sgd":
        return _FP32 * n_params
    if optimizer == "adafactor":
        return _FP32 * sum(adafactor_state_elems(shape) for shape in param_shapes) + step_bytes
    raise ValueError(f"no optimizer-state formula for {optimizer!r}")


def checkpointed_blocks(ckpt: str, k: int, n_blocks: int) -> int:
    """How many of ``n_blocks`` blocks the checkpointing policy wraps (asks the policy)."""
    from . import checkpointing

    policy = checkpointing.make_policy(ckpt, k)
    return sum(policy.selects(i, n_blocks) for i in range(n_blocks))


@dataclass(frozen=True)
class DecoderShape:
    """A decoder-only transformer as the activation formula sees it: the GPT presets and the
    ``hf:`` architectures (GPT-2, Llama, Qwen2, Mistral) differ only in these.

    ``norm``: ``layernorm`` or ``rmsnorm``; ``mlp``: ``gelu`` (one fused kernel), ``gelu_new``
    (GPT-2's GELU written as Python arithmetic, whose intermediates autograd keeps) or
    ``swiglu``; ``fused_qkv``: one projection makes q, k and v (GPT) rather than three
    (Llama); ``tied``: the output head shares the token embedding's weight; ``rope``: rotary
    position embeddings (cos/sin tables) rather than learned ones; ``position_rows``: rows of
    the learned position embedding (0 with rotary ones).
    """

    seq_len: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    inner: int
    vocab: int
    norm: str = "layernorm"
    mlp: str = "gelu"
    fused_qkv: bool = True
    tied: bool = True
    rope: bool = False
    position_rows: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def decoder_shape(config: BenchConfig) -> DecoderShape | None:
    """The ``DecoderShape`` of ``config``'s model: a GPT preset or an ``hf:`` architecture
    with its overrides; None for other models (no activation formula)."""
    if presets.is_user_model(config.model):
        return None
    family, dims = presets.preset_dims(config.model, config.overrides)
    if family == "gpt":
        h, a = dims["d_model"], dims["n_heads"]
        return DecoderShape(dims["seq_len"], h, dims["n_layers"], a, a, 4 * h, dims["vocab"],
                            position_rows=dims["seq_len"])
    if not hf_table.is_hf(config.model):
        return None
    n, fixed = hf_table.names(family), hf_table.arch(config.model).fixed
    if family == "gpt2":
        h = dims[n["hidden"]]
        return DecoderShape(dims["seq_len"], h, dims[n["layers"]], dims[n["heads"]], dims[n["heads"]], 4 * h,
                            dims[n["vocab"]], mlp=fixed["activation_function"], position_rows=dims["n_positions"])
    return DecoderShape(dims["seq_len"], dims[n["hidden"]], dims[n["layers"]], dims[n["heads"]], dims[n["kv_heads"]],
                        dims[n["inner"]], dims[n["vocab"]], norm="rmsnorm", mlp="swiglu", fused_qkv=False,
                        tied=bool(fixed.get("tie_word_embeddings", False)), rope=True)


# Elements per token of the inner (MLP) width that autograd keeps for each MLP kind:
# gelu: fc output (GELU input) and GELU output; gelu_new, 0.5·x·(1 + tanh(c·(x + 0.044715·x³))):
# x (kept by pow), tanh's output, 0.5·x and 1 + tanh (kept by the product) and the product
# (the projection's input); swiglu: gate output (SiLU input), SiLU output, up output and their
# product (the down projection's input).
_MLP_SAVED = {"gelu": 2, "gelu_new": 5, "swiglu": 4}
# Elements per token of the inner width that are matmul outputs (kept by selective checkpointing).
_MLP_MATMUL_OUT = {"gelu": 1, "gelu_new": 1, "swiglu": 2}


def _norm_bytes(shape: DecoderShape) -> int:
    """Bytes per token one normalisation layer keeps (its input is the fp32 residual stream,
    fp32 under autocast too: fp32 parameters and residual adds promote). LayerNorm: its input
    and fp32 mean and rstd. RMSNorm as transformers writes it (x · rsqrt(mean(x²) + eps),
    then · weight): its input, the normalised x (kept by the weight product) and rstd."""
    if shape.norm == "layernorm":
        return _FP32 * shape.hidden + 2 * _FP32
    return 2 * _FP32 * shape.hidden + _FP32


def _matmul_input_bytes(shape: DecoderShape, readers: int, precision: str) -> int:
    """Bytes per token of a normalisation output read by ``readers`` projections: in fp32 the
    one output, which each keeps; under autocast each projection casts its own copy (autocast
    caches casts of weights only), and keeps it."""
    c = _COMPUTE_BYTES[precision]
    return shape.hidden * (_FP32 if precision == "fp32" else readers * c)


def layer_activation_bytes(shape: DecoderShape, b: int, precision: str, attention: str = "auto") -> int:
    """Bytes one transformer block keeps for backward (no checkpointing) at micro-batch ``b``.

    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models", eq. 1: ``sbh(34 + 5as/h)`` bytes per layer, counted for 2-byte activations and
    1-byte dropout masks: 11sbh attention + 19sbh MLP + 4sbh for the two LayerNorm inputs,
    plus 5as²b for the softmax output (2), its dropout mask (1) and dropout output (2).
    Adapted to these models:

    * SDPA stores no s×s matrix (flash / memory-efficient kernels keep q, k, v, the output
      and a logsumexp), so the 5as/h term goes; the output projection's input is a view of
      the SDPA output (its memory is already (b, s, a, h/a)), so nothing is added for it.
      With grouped-query attention k and v have ``kv_heads`` heads (SDPA's ``enable_gqa``
      never repeats them).
    * No dropout: the two 1-byte masks (attention output, MLP output) go. For the GPT preset
      34 -> 32 bytes, i.e. 16 sbh *elements*: LayerNorm inputs 2, qkv input 1, q/k/v 3,
      attention output 1, fc input 1, fc output (GELU input) 4, GELU output 4.
    * Element size instead of Korthikanti's 2 bytes: the normalisation inputs are the fp32
      residual stream (``_norm_bytes``); the rest is in the compute dtype (4 B in fp32, 2 B
      in bf16/fp16, where autocast's cast copy, not the fp32 norm output, is what the next
      projection keeps: one per projection, ``_matmul_input_bytes``). GPT preset, fp32:
      64 sbh bytes, bf16/fp16: 36 sbh bytes per layer.
    * The MLP keeps what its activation's autograd keeps (``_MLP_SAVED``), per inner element.
    * Small terms Korthikanti drops, kept here because they are exact: LayerNorm mean and
      rstd (fp32; RMSNorm's rstd) and SDPA's logsumexp (fp32, 4asb bytes).
    * With the math SDPA backend (``attention="math"``) the softmax output is an s×s matrix
      per head that backward needs (a·s²·b in the compute dtype, Korthikanti's softmax term
      without dropout), and there is no logsumexp.
    """
    c = _COMPUTE_BYTES[precision]
    d = shape.head_dim
    # Per token: the fp32 logsumexp per head, or with the math backend a softmax row (s) per head.
    attention_saved = c * shape.heads * shape.seq_len if attention == "math" else _FP32 * shape.heads
    per_token = (
        2 * _norm_bytes(shape)
        + _matmul_input_bytes(shape, 1 if shape.fused_qkv else 3, precision)
        + c * (shape.heads + 2 * shape.kv_heads) * d  # q, k, v (SDPA's inputs)
        + c * shape.heads * d + attention_saved  # SDPA output and what its backward needs
        + _matmul_input_bytes(shape, 2 if shape.mlp == "swiglu" else 1, precision)
        + c * _MLP_SAVED[shape.mlp] * shape.inner
    )
    return shape.seq_len * b * per_token


def gpt_layer_activation_bytes(s: int, b: int, h: int, a: int, precision: str, attention: str = "auto") -> int:
    """Bytes one GPTBlock of the presets keeps for backward (``layer_activation_bytes``)."""
    return layer_activation_bytes(DecoderShape(s, h, 1, a, a, 4 * h, 1), b, precision, attention)


def _block_input_bytes(shape: DecoderShape, b: int) -> int:
    # A checkpointed block keeps only its input: Korthikanti's 2sbh (fp16) is sbh elements;
    # here the residual stream is fp32.
    return _FP32 * shape.seq_len * b * shape.hidden


def _selective_layer_bytes(shape: DecoderShape, b: int, precision: str) -> int:
    # Selective checkpointing saves the block input, the matmul outputs (q/k/v, the output
    # projection, the MLP's up projection(s) and down projection: 9 sbh elements for the GPT
    # preset, in the compute dtype) and the attention kernel's outputs (its output in the
    # compute dtype and the fp32 logsumexp), and recomputes norms, activations, rotary
    # embeddings, casts and residual adds. (The math SDPA backend is no kernel the policy
    # saves: it keeps less, which this does not model.)
    c, d = _COMPUTE_BYTES[precision], shape.head_dim
    matmul_out = (shape.heads + 2 * shape.kv_heads) * d + shape.hidden + _MLP_MATMUL_OUT[shape.mlp] * shape.inner \
        + shape.hidden
    per_token = c * (matmul_out + shape.heads * d) + _FP32 * shape.heads
    return _block_input_bytes(shape, b) + shape.seq_len * b * per_token


def _activation_terms(shape: DecoderShape, batch: int, config: BenchConfig, facts: _ModelFacts, device_type: str) -> dict:
    """inputs, activations and backward transient (bytes) of a decoder model, with notes.

    Offloaded activations (``ckpt`` offload) are off the device on CUDA, where the host is
    other memory; on any other device the host copies are in the device's own memory, so
    they count as kept, exactly as without offloading."""
    s, h, L, V = shape.seq_len, shape.hidden, shape.layers, shape.vocab
    b, c = batch, _COMPUTE_BYTES[config.precision]
    full_layer = layer_activation_bytes(shape, b, config.precision, config.attention)
    n_ckpt = checkpointed_blocks(config.ckpt, config.k, L)
    per_ckpt = (
        _selective_layer_bytes(shape, b, config.precision)
        if config.ckpt == "selective"
        else _block_input_bytes(shape, b)
    )
    blocks = n_ckpt * per_ckpt + (L - n_ckpt) * full_layer
    # cross_entropy runs in fp32 (also under autocast) and keeps its log-probabilities:
    # s·b·vocab fp32, the term that dominates small models.
    log_probs = _FP32 * s * b * V
    # Head: the final norm and the lm_head input (compute dtype); position ids (int64), and
    # with rotary embeddings their fp32 cos and sin tables (s × head_dim each).
    positions = _INDEX * s + (2 * _FP32 * s * shape.head_dim if shape.rope else 0)
    head = s * b * (_norm_bytes(shape) + _matmul_input_bytes(shape, 1, config.precision)) + positions
    # Autocast keeps the low-precision copy of each projection weight it cast alive until
    # that layer's backward; inside a checkpointed block the cast is recomputed, not kept.
    cast_elems = facts.cast_elems_outside + (L - n_ckpt) * facts.cast_elems_per_block
    casts = c * cast_elems if config.precision != "fp32" else 0
    # At the start of backward nll_loss and log_softmax each produce an s·b·vocab fp32
    # gradient while the log-probabilities are still held: two more of them.
    loss_backward = 2 * log_probs
    # By the time the last block is recomputed the loss tensors are freed and the output
    # head's gradient (vocab × hidden) exists; the block's full activations are rebuilt and
    # the gradient flowing into it (fp32) is alive.
    recompute = full_layer + _FP32 * (V * h + s * b * h) - log_probs if n_ckpt else 0
    notes = [
        f"blocks: {L - n_ckpt} kept × {full_layer / GIB:.3g} GiB + {n_ckpt} checkpointed × {per_ckpt / GIB:.3g} GiB",
        f"log-probabilities (s·b·vocab fp32): {log_probs / GIB:.3g} GiB, plus 2× that at the start of backward",
    ]
    if casts:
        notes.append(f"autocast weight copies: {casts / GIB:.3g} GiB")
    kept = blocks + head + log_probs + casts
    if config.ckpt == "offload" and device_type == "cuda":
        # Everything autograd saves goes to host memory. On the device remain the tensors
        # of the operation running: one block's in its forward, or its saved tensors copied
        # back for its backward with the gradient flowing in (and the tied embedding's
        # gradient), or at the start of backward the log-probabilities copied back next to
        # their two gradients.
        notes = [f"offloaded to host memory: {kept / GIB:.3g} GiB of saved activations; on the device one "
                 "block's (or the loss's) at a time"]
        return {"inputs": config.accum * 2 * _INDEX * s * b, "activations": 0,
                "transient": max(3 * log_probs, full_layer + _FP32 * (V * h + s * b * h)), "notes": notes}
    if config.ckpt == "offload":
        notes.append(f"offloading on the {device_type}: host memory is the device's own memory (kept)")
    return {
        # Token ids and targets (int64) of every micro-batch.
        "inputs": config.accum * 2 * _INDEX * s * b,
        "activations": kept,
        "transient": max(loss_backward, recompute),
        "notes": notes,
    }


def optimizer_step_transient_bytes(optimizer: str, param_shapes: Sequence[tuple[int, ...]], device_type: str,
                                   impl: str = "auto") -> int:
    """Temporary memory of the optimizer step as engine/step.py runs it (about: the largest
    scratch torch.optim allocates at one time).

    Fused kernels and SGD's in-place momentum update allocate nothing of parameter size.
    Multi-tensor (foreach) AdamW materialises sqrt(exp_avg_sq) for every parameter at once, and
    foreach Adafactor its full-size variance estimate (the matrices' list is still held while
    the vectors' is made): one fp32 copy of the parameters. Per-parameter (loop) kernels hold
    two such temporaries at a time (AdamW: sqrt(exp_avg_sq) and its quotient; Adafactor: the
    previous parameter's estimate and the next): twice the largest parameter.
    """
    chosen = optimizer_impl_for(optimizer, impl, device_type)
    if optimizer == "sgd" or chosen == "fused" or not param_shapes:
        return 0
    if chosen == "foreach":
        return _FP32 * sum(_numel(shape) for shape in param_shapes)
    return 2 * _FP32 * max(_numel(shape) for shape in param_shapes)


def analytic_estimate(config: BenchConfig, batch: int | None = None, device_type: str | None = None) -> AnalyticEstimate | None:
    """The analytic memory estimate of ``config`` at micro-batch ``batch`` (default: config.batch).

    ``device_type`` ("cpu", "cuda"; default: the config's device) decides the optimizer
    implementation "auto" stands for and where torch keeps the optimizer's step counters. None when the model cannot be built on the
    meta device (some user models).
    """
    facts = _model_facts(config)
    if facts is None:
        return None
    b = config.batch if batch is None else batch
    device_type = device_type or resolve_device(config.device).split(":")[0]
    params = _FP32 * facts.n_params  # parameters stay fp32; autocast casts copies
    grads = _FP32 * facts.n_params  # gradients of fp32 parameters are fp32
    optimizer = optimizer_state_bytes(config.optimizer, facts.param_shapes, device_type, config.optimizer_impl)
    opt_transient = optimizer_step_transient_bytes(config.optimizer, facts.param_shapes, device_type,
                                                   config.optimizer_impl)
    params, grads, optimizer, opt_transient, extra, dp_notes = _data_parallel_terms(
        config, facts, params, grads, optimizer, opt_transient)
    shape = decoder_shape(config)
    if shape is None:
        return AnalyticEstimate(params, grads, optimizer, None, None, None, None,
                                ("no activation formula for this model", *dp_notes), extra)
    terms = _activation_terms(shape, b, config, facts, device_type)
    # set_to_none zero_grad: with one micro-batch no gradient exists when backward starts;
    # with accumulation the earlier micro-batches' gradients do.
    grads_at_backward = grads if config.accum > 1 else 0
    backward = params + optimizer + grads_at_backward + terms["inputs"] + terms["activations"] + terms["transient"]
    optimizer_step = params + grads + optimizer + terms["inputs"] + opt_transient
    # The last thing backward does with tied embeddings is the embedding's gradient: lm_head's
    # (vocab × hidden) is ready, the embedding lookup's dense one is made, and their sum is a
    # third, with every other gradient already alive: two vocab × hidden fp32 tensors on top
    # of all the gradients. Untied, the lookup's gradient is the embedding's own gradient.
    tied = 2 * _FP32 * shape.vocab * shape.hidden if shape.tied else 0
    end_of_backward = params + grads + optimizer + terms["inputs"] + tied
    # The wrapper's memory (DDP's buckets, FSDP's gathered units) is there for the whole step.
    single_process_peak = max(backward, optimizer_step, end_of_backward)
    peak = single_process_peak + extra
    notes = list(terms["notes"]) + dp_notes
    if tied and single_process_peak == end_of_backward:
        notes.append(f"peak at the end of backward: the tied embedding's gradient adds {tied / GIB:.3g} GiB to all the gradients")
    return AnalyticEstimate(
        params, grads, optimizer, terms["inputs"], terms["activations"], terms["transient"], peak, tuple(notes), extra,
    )


def _data_parallel_terms(config: BenchConfig, facts: _ModelFacts, params: int, grads: int, optimizer: int,
                         opt_transient: int) -> tuple[int, int, int, int, int, list[str]]:
    """One rank's (params, grads, optimizer, optimizer-step transient, wrapper bytes, notes).

    DDP replicates everything and all-reduces gradients through flat buckets that together
    hold one more copy of the gradients (``gradient_as_bucket_view`` is off by default).
    FSDP keeps 1/N of parameters, gradients and optimizer state (the optimizer steps on the
    shards); one unit's parameters are gathered whole at a time (its largest), or, when
    units do not reshard after forward, every unit's until its backward.
    """
    if config.parallel == "ddp":
        return params, grads, optimizer, opt_transient, grads, [
            f"DDP: {config.nproc} replicas, all-reduce buckets of {grads / GIB:.3g} GiB (one more copy of the gradients)"]
    if config.parallel == "fsdp":
        n = config.nproc
        gathered = _FP32 * (facts.largest_unit_params if config.reshard else facts.n_params)
        what = "the largest unit" if config.reshard else "every unit (no reshard after forward)"
        return (-(-params // n), -(-grads // n), -(-optimizer // n), -(-opt_transient // n), gathered,
                [f"FSDP: parameters, gradients and optimizer state / {n}, plus {what} gathered: {gathered / GIB:.3g} GiB"])
    return params, grads, optimizer, opt_transient, 0, []


def analytic_max_batch(
    config: BenchConfig, capacity_bytes: float, margin: float = DEFAULT_MARGIN, device_type: str | None = None, limit: int = 1 << 24
) -> int | None:
    """Largest micro-batch whose analytic peak leaves ``margin`` free; None without a formula."""
    first = analytic_estimate(config, 1, device_type)
    if first is None or first.peak is None:
        return None
    return _largest_batch(lambda b: analytic_estimate(config, b, device_type).peak, usable_bytes(capacity_bytes, margin), limit)


# ------------------------------------------------------------------------- reports
def _rel_error(estimate: float | None, measured: float) -> float | None:
    return None if estimate is None or not measured else (estimate - measured) / measured


def comparison_rows(points: Sequence[tuple[int, float]], fit: PeakFit | None, config: BenchConfig) -> list[dict]:
    """Measured vs fitted vs analytic peak per measured batch, with relative errors
    ((estimate - measured) / measured; positive = overestimate)."""
    rows = []
    for batch, measured in points:
        fitted = fit.predict(batch) if fit else None
        estimate = analytic_estimate(config, batch)
        analytic = estimate.peak if estimate else None
        rows.append(
            {
                "batch": batch,
                "measured_bytes": measured,
                "fitted_bytes": fitted,
                "analytic_bytes": analytic,
                "fitted_error": _rel_error(fitted, measured),
                "analytic_error": _rel_error(analytic, measured),
            }
        )
    return rows


@dataclass(frozen=True)
class Capacity:
    """A memory size to predict for: the current device, or a GPU size the user typed."""

    label: str
    bytes: float
    device_type: str  # decides the optimizer implementation in the analytic estimate


def capacities(values_gib: Iterable[float], device_capacity_bytes: float | None = None, device_type: str = "cpu",
               capped: bool = False) -> list[Capacity]:
    """The device first (when its capacity is known; ``capped``: it is the config's memory cap),
    then each typed GiB value as a GPU."""
    named = []
    if device_capacity_bytes:
        size = f"{device_capacity_bytes / GIB:.1f} GiB"
        label = f"memory cap {size} on this {device_type}" if capped else f"this {device_type} ({size})"
        named.append(Capacity(label, float(device_capacity_bytes), device_type))
    for gib in values_gib:
        if not gib > 0:
            raise ValueError(f"a capacity must be > 0 GiB, got {gib!r}")
        named.append(Capacity(f"{gib:g} GiB", gib * GIB, "cuda"))
    return named


def capacity_rows(fit: PeakFit | None, config: BenchConfig, targets: Iterable[Capacity], margin: float = DEFAULT_MARGIN) -> list[dict]:
    """Predicted largest micro-batch per capacity, from the fit and from the analytic estimate.

    The fit comes from the device it was measured on; applied to another GPU it assumes the
    same allocator behaviour, which is why both answers are shown.
    """
    return [
        {
            "capacity": target.label,
            "capacity_bytes": target.bytes,
            "fitted_max_batch": fit.max_batch(target.bytes, margin) if fit else None,
            "analytic_max_batch": analytic_max_batch(config, target.bytes, margin, target.device_type),
        }
        for target in targets
    ]


def report(points: Sequence[tuple[int, float]], config: BenchConfig, targets: Iterable[Capacity], margin: float = DEFAULT_MARGIN) -> dict:
    """Everything the CLI and the dashboard show for one configuration's memory prediction.

    ``points`` are measured (batch, peak bytes). Returns config, margin, points, fit (through
    the points that grow with the batch, with its max_error and the batches left_out; None
    when fewer than two do), fit_problem (why there is no fit, or None), analytic (the
    estimate at config.batch, or None), comparison (``comparison_rows``), capacities
    (``capacity_rows``) and curve: the analytic peak at batches 1 .. twice the largest
    measured (None values without a formula), for drawing.
    """
    points = sorted((int(b), float(p)) for b, p in points)
    used = growing_points(points)
    fit = fit_peak(used) if len(used) >= 2 else None
    if fit is not None:
        problem = None
    elif len({b for b, _ in points}) >= 2:
        problem = (f"the measured peaks (batches {', '.join(str(b) for b, _ in points)}) do not grow with the batch: "
                   "weights, gradients and optimizer state set the peak there, so a line through them cannot say "
                   "where memory runs out; measure larger batches")
    else:
        problem = "a fit needs measured peaks at two or more batch sizes"
    analytic = analytic_estimate(config)
    top = max([config.batch] + [b for b, _ in points]) * 2
    curve = []
    for batch in sorted({max(1, round(top * i / 32)) for i in range(33)}):
        estimate = analytic_estimate(config, batch)
        curve.append((batch, estimate.peak if estimate else None))
    return {
        "config": config.to_dict(),
        "margin": margin,
        "points": [list(p) for p in points],
        "fit": fit.to_dict() | {"left_out": [point[0] for point in points if point not in used]} if fit else None,
        "fit_problem": problem,
        "analytic": analytic.to_dict() if analytic else None,
        "comparison": comparison_rows(points, fit, config),
        "capacities": capacity_rows(fit, config, targets, margin),
        "curve": [list(p) for p in curve],
    }
