"""Robust summaries of repeated timings: median and spread, never one sample.

Modelled on ``torch.utils.benchmark.Measurement``: an immutable object with the median,
the 10th/90th percentiles and the interquartile range relative to the median, which is the
noise figure the dashboard and the noise warning use.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

NOISE_THRESHOLD = 0.10
# The timed metrics of a step, in words (for warnings, tables and charts).
TIMED_WORDS = {"step_ms": "step time", "forward_ms": "forward time", "backward_ms": "backward time",
               "optimizer_ms": "optimizer time"}
"""IQR/median above which a phase's timings are reported as noisy (10%)."""


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of already sorted samples, linearly interpolated.

    Same definition as ``numpy.percentile``'s default ("linear"), so figures can be checked
    against numpy by hand.
    """
    if not sorted_samples:
        raise ValueError("percentile of no samples")
    position = (len(sorted_samples) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(sorted_samples) - 1)
    fraction = position - lower
    return sorted_samples[lower] + (sorted_samples[upper] - sorted_samples[lower]) * fraction


@dataclass(frozen=True)
class Summary:
    """Median, p10, p90 and IQR/median of one metric over the measured steps."""

    median: float
    p10: float
    p90: float
    iqr_rel: float

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> "Summary":
        """Summarise samples (at least one). ``iqr_rel`` is 0 when the median is 0."""
        ordered = sorted(float(s) for s in samples)
        if not ordered:
            raise ValueError("Summary.from_samples needs at least one sample")
        median = percentile(ordered, 50)
        iqr = percentile(ordered, 75) - percentile(ordered, 25)
        # A zero median (a phase that does nothing) has no meaningful relative spread.
        iqr_rel = iqr / median if median > 0 else 0.0
        return cls(median=median, p10=percentile(ordered, 10), p90=percentile(ordered, 90), iqr_rel=iqr_rel)

    @property
    def noisy(self) -> bool:
        """Whether the relative spread exceeds ``NOISE_THRESHOLD``."""
        return self.iqr_rel > NOISE_THRESHOLD

    def noise_words(self, what: str) -> str:
        """The spread in words for people, e.g. "step time varies by 43 % between steps (middle
        half of the steps) — treat with care"; ``what`` names the metric."""
        care = " — treat with care" if self.noisy else ""
        return f"{what} varies by {self.iqr_rel:.0%} between steps (middle half of the steps){care}"

    def to_dict(self) -> dict:
        """``{"median", "p10", "p90", "iqr_rel"}`` as plain floats (the result schema's form)."""
        return {"median": self.median, "p10": self.p10, "p90": self.p90, "iqr_rel": self.iqr_rel}

    def __repr__(self) -> str:
        flag = "  (noisy)" if self.noisy else ""
        return (
            f"Summary(median={self.median:.4g}, p10={self.p10:.4g}, p90={self.p90:.4g}, "
            f"IQR/median={self.iqr_rel:.1%}){flag}"
        )
