"""The write-up the exercise ends in, as data: the change-log report (``compare``), the checks,
each iteration's layer table and data-flow graph, the training curves of the comparable runs,
and the evaluation (misclassified digits, confusion matrix) of the final iteration's best
comparable run (the final iteration: ``Experiments.final``, never merely the last one measured). Nothing here formats text: ``render.report`` writes the Markdown and the HTML.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mnistkit import __version__
from mnistkit.results.check import CheckReport, checks_of
from mnistkit.results.compare import build_report
from mnistkit.errors import MnistkitError
from mnistkit.experiments import Experiments
from mnistkit.recipe import DEFAULT_RUNS_DIR

__all__ = ["IterationPart", "WriteUp", "build_write_up"]

EXPLAINED = 3   # the report explains this many of the final iteration's most confident mistakes


@dataclass
class IterationPart:
    row: dict[str, Any]          # the iteration as compare reports it
    summary: Any                 # mnistkit.introspect.summary.ModelSummary of its current model
    graph: Any                   # mnistkit.introspect.graph.ModelGraph
    curves: list[Any]            # curves.RunCurve of its comparable runs, one per seed


@dataclass
class WriteUp:
    compare: dict[str, Any]
    checks: CheckReport
    iterations: list[IterationPart]
    generated: str
    version: str = __version__
    best: Any = None             # evaluation.EvaluationReport of the best comparable run (final epoch)
    explained: Any = None        # explain.ExplainResult of its most confident mistakes (EXPLAINED of them)
    best_run: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what could not be included, and why


def build_write_up(experiments: Experiments, runs_dir: str | Path = DEFAULT_RUNS_DIR, *,
                   evaluate_best: bool = True, device: str = "cpu") -> WriteUp:
    from mnistkit.results.curves import run_curve
    from mnistkit.introspect.graph import model_graph

    built: dict[str, Any] = {}
    report = build_report(experiments, runs_dir, models=built)
    checks = checks_of(report)
    parts = []
    for row in report["iterations"]:
        model, s = built[row["id"]]
        m = row["measured"]
        curves = [run_curve(r, group=row["id"]) for r in m["runs"]] if m else []
        parts.append(IterationPart(row, s, model_graph(model, s), curves))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = WriteUp(report, checks, parts, stamp)
    out.notes += [f"skipped a damaged run folder: {d['why']}" for d in report.get("damaged_runs", [])]
    final_part = next((p for p in parts if p.row.get("final")), parts[-1] if parts else None)
    if evaluate_best and final_part is not None and final_part.row["measured"]:
        final = final_part.row
        best = max(final["measured"]["per_seed"], key=lambda s: s["test_acc"])
        out.best_run = {"iteration": final["id"], **best}
        try:
            from mnistkit.training.evaluation import evaluate_checkpoint

            out.best = evaluate_checkpoint(Path(best["run"]) / "last.pt", device=device)
            if out.best.mistakes:   # what the model saw in its most confident mistakes
                from mnistkit.inference.explain import explain_digits

                shown = out.best.mistakes[:EXPLAINED]
                out.explained = explain_digits(Path(best["run"]) / "last.pt", out.best.mistake_images[:EXPLAINED],
                                               [f"test digit {m['index']} (true {m['label']})" for m in shown],
                                               channels=6, device=device)
        except MnistkitError as exc:
            out.notes.append(f"the misclassified digits and the confusion matrix of {best['run']} are left out: {exc}")
    return out
