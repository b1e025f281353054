"""An ablation's results: each run's figures, the per-cell summaries and the table.

A cell's summary is the mean and standard deviation of its seeds' final figure of the
ablation's metric (test accuracy unless it says otherwise) and, for
every cell but the baseline, the mean of the seed-by-seed differences from the baseline with a
95% paired t interval: seed ``s`` of every cell shares its initialisation and data order.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import attrs

from hooktrain.ablation.spec import FORMAT, VERSION, Cell


@attrs.frozen
class CellSummary:
    """A cell's figures over its seeds; accuracies are fractions, ``delta`` is against the
    baseline, paired by seed, with its 95% interval (None with fewer than two seeds)."""

    cell: str
    baseline: bool
    runs: int
    mean: float
    std: float | None
    delta: float | None
    delta_low: float | None
    delta_high: float | None
    seconds: float


def _t_quantile(probability: float, degrees: int) -> float:
    from scipy import stats  # imported here: a second of import time only ablations pay

    return float(stats.t.ppf(probability, degrees))


def summarise(
    cell: Cell, accuracies: Sequence[float], baseline: Sequence[float] | None, seconds: float
) -> CellSummary:
    """Mean, std (n-1) and, against ``baseline`` (same seeds, same order), the paired delta."""
    n = len(accuracies)
    std = statistics.stdev(accuracies) if n > 1 else None
    delta = low = high = None
    if baseline is not None:
        differences = [a - b for a, b in zip(accuracies, baseline, strict=True)]
        delta = statistics.fmean(differences)
        if n > 1:
            half = _t_quantile(0.975, n - 1) * statistics.stdev(differences) / math.sqrt(n)
            low, high = delta - half, delta + half
    mean = statistics.fmean(accuracies)
    return CellSummary(cell.name, cell.baseline, n, mean, std, delta, low, high, seconds)


@attrs.define
class AblationResult:
    """Everything ``ablation.json`` holds: the spec, the cells and every finished run."""

    spec: dict[str, Any]
    cells: list[Cell]
    runs: dict[str, dict[str, dict[str, float]]]  # cell name -> seed -> figures

    def summaries(self) -> list[CellSummary]:
        """One summary per cell with all its seeds finished, the baseline's first."""
        seeds = [str(s) for s in self.spec["seeds"]]

        def accuracies(cell: Cell) -> list[float] | None:
            runs = self.runs.get(cell.name, {})
            if not all(s in runs for s in seeds):
                return None
            return [runs[s][self.metric] for s in seeds]

        base = accuracies(self.cells[0])
        summaries = []
        for cell in self.cells:
            cell_accuracies = accuracies(cell)
            if cell_accuracies is None:
                continue
            seconds = sum(run["seconds"] for run in self.runs[cell.name].values())
            reference = None if cell.baseline else base
            summaries.append(summarise(cell, cell_accuracies, reference, seconds))
        return summaries

    def to_json(self) -> dict[str, Any]:
        """The file's contents; :meth:`from_json` reads them back."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "spec": self.spec,
            "cells": [
                {
                    "name": cell.name,
                    "folder": cell.folder,
                    "baseline": cell.baseline,
                    "settings": dict(cell.settings),
                    "runs": self.runs.get(cell.name, {}),
                }
                for cell in self.cells
            ],
            "summary": [attrs.asdict(summary) for summary in self.summaries()],
        }

    @property
    def metric(self) -> str:
        """The figure the cells are compared by."""
        return self.spec["metric"]

    def table(self) -> str:
        """The summaries as a Markdown table: accuracies in percent and their deltas in points,
        other metrics as they are."""
        scale, unit = (100, " %") if self.metric.endswith(("accuracy", "top5")) else (1, "")
        digits = 2 if scale == 100 else 4

        def shown(value: float | None) -> str:
            return "-" if value is None else f"{scale * value:.{digits}f}"

        name = self.metric.replace("_", " ")
        points = ", points" if scale == 100 else ""
        lines = [
            f"| cell | seeds | {name}{unit} (mean ± std) | Δ vs baseline{points} [95% CI] "
            "| wall s |",
            "|---|---:|---:|---:|---:|",
        ]
        for s in self.summaries():
            accuracy = shown(s.mean) + ("" if s.std is None else f" ± {shown(s.std)}")
            if s.baseline:
                delta = "(baseline)"
            elif s.delta is None:
                delta = "- (baseline unfinished)"
            else:
                interval = (
                    ""
                    if s.delta_low is None
                    else (
                        f" [{scale * s.delta_low:+.{digits}f}, {scale * s.delta_high:+.{digits}f}]"
                    )
                )
                delta = f"{scale * s.delta:+.{digits}f}{interval}"
            lines.append(f"| {s.cell} | {s.runs} | {accuracy} | {delta} | {s.seconds:.1f} |")
        return "\n".join(lines)

    def markdown(self) -> str:
        """``ablation.md``: what was varied, the table, and how to read it."""
        recipe = self.spec["recipe"]["recipe"]["name"]
        vary = "; ".join(f"{k} = {', '.join(v)}" for k, v in self.spec["vary"].items())
        seeds = ", ".join(map(str, self.spec["seeds"]))
        return (
            f"# Ablation of {recipe}\n\n"
            f"Varied ({self.spec['mode']}, first value = baseline): {vary}.\n"
            f"Seeds: {seeds}. The figure is the final {self.metric.replace('_', ' ')}; std is "
            "over seeds (n-1).\n"
            "Δ is the mean over seeds of (cell - baseline) for the same seed, with a 95% paired "
            "t interval; wall s is the time spent training the cell's seeds.\n\n"
            f"{self.table()}\n"
        )
