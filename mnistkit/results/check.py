"""The change-log's constraints as a gate: every iteration (or one) checked, each check a case
that passed or failed with one line saying why. The constraints are the assignment's, and the
assignment is handed in as one model: they *gate* the final iteration (``final: true`` in the
change-log, else the last one); the other iterations are exploratory (a baseline below the target
is the point of a baseline), so their cases are reported, never gated. An iteration named with
``iteration=`` is gated, as is every one with ``every=True``. ``static`` checks what needs no training (the
model's parameters, BatchNorm, Dropout, GAP head; the recipe's epochs); otherwise the accuracy
checks use the comparable runs as ``compare`` does, and an iteration with none fails them.
Pure data: ``render`` writes the lines, the JUnit XML and the JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mnistkit.results.compare import build_report
from mnistkit.runs.comparable import earlier_version
from mnistkit.errors import UsageError
from mnistkit.experiments import Experiments
from mnistkit.recipe import DEFAULT_RUNS_DIR

__all__ = ["Case", "CheckReport", "run_checks", "checks_of"]


@dataclass(frozen=True)
class Case:
    iteration: str
    check: str        # params, batchnorm, dropout, gap_head, epochs, test_acc, consistent
    passed: bool
    detail: str       # what was measured, against what limit
    gated: bool = True  # False: an exploratory iteration's case, shown and never failing the gate


@dataclass
class CheckReport:
    experiments: str
    runs_dir: str | None  # None: static (no runs read)
    static: bool
    cases: list[Case] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)   # run folders that could not be read (skipped)
    final: str | None = None   # the final iteration's id

    @property
    def gated(self) -> list[Case]:
        return [c for c in self.cases if c.gated]

    @property
    def failed(self) -> list[Case]:
        """The gated cases that failed: what makes the gate fail."""
        return [c for c in self.cases if c.gated and not c.passed]

    @property
    def not_gated_failed(self) -> list[Case]:
        """Exploratory iterations' cases that did not pass: reported, never failing the gate."""
        return [c for c in self.cases if not c.gated and not c.passed]

    @property
    def passed(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {"experiments": self.experiments, "runs_dir": self.runs_dir, "static": self.static,
                "passed": self.passed, "final": self.final, "checks": len(self.cases),
                "gated": len(self.gated), "failed": len(self.failed),
                "not_gated_failed": len(self.not_gated_failed),
                "cases": [asdict(c) for c in self.cases], "damaged_runs": self.damaged}


def run_checks(experiments: Experiments, runs_dir: str | Path = DEFAULT_RUNS_DIR, *,
               iteration: str | None = None, static: bool = False, every: bool = False) -> CheckReport:
    """Check every iteration of ``experiments`` (or the one of id ``iteration``, gated): the final
    iteration's cases gate, the others' are reported (``every``: every iteration's gate)."""
    if iteration is not None:
        iteration = experiments.iteration(iteration).id  # an unknown id is one line naming the known ones
    out = checks_of(build_report(experiments, runs_dir, static=static), iteration, static, every)
    if not out.gated:   # zero checks must not read as a pass
        raise UsageError(f"{experiments.path} gives nothing to check: it has no iteration or no constraint "
                         "(constraints: max_params, batchnorm, dropout, gap_head, max_epochs, min_test_acc)")
    return out


def checks_of(report: dict[str, Any], iteration: str | None = None, static: bool = False,
              every: bool = False) -> CheckReport:
    """The checks of a ``compare.build_report`` report (of one iteration id, or all); the final
    iteration's gate, the others' are reported only (unless named, or ``every``)."""
    out = CheckReport(report["experiments"], None if static else report["runs_dir"], static,
                      damaged=[d["why"] for d in report.get("damaged_runs", [])], final=report.get("final"))
    c = report["constraints"]
    for row in report["iterations"]:
        if iteration is not None and row["id"] != iteration:
            continue
        gated = every or iteration is not None or row.get("final", True)
        for check, value in row["checks"].items():
            passed = value["of"] > 0 and value["passed"] == value["of"] if isinstance(value, dict) else bool(value)
            out.cases.append(Case(row["id"], check, passed, _detail(check, value, row, c, report), gated))
    return out


def _detail(check: str, value: Any, row: dict[str, Any], c: dict[str, Any], report: dict[str, Any]) -> str:
    uses = row["uses"]
    if check == "params":
        limit, params = c["max_params"], row["params"]
        margin = f"{limit - params:,} to spare" if params < limit else f"{params - limit:,} over"
        return f"{params:,} trainable parameters; fewer than {limit:,} allowed ({margin})"
    if check in ("batchnorm", "dropout", "gap_head"):
        what = {"batchnorm": "a BatchNorm layer", "dropout": "a Dropout layer",
                "gap_head": "a global-average-pooling head"}[check]
        if check == "gap_head" and not uses["gap_head"] and uses["fc_head"]:
            return f"the model has no {what[2:]} (its head is fully connected)"
        return f"the model has {what}" if value else f"the model has no {what[2:]}"
    if check == "epochs":
        epochs, limit = row["recipe"]["epochs"], c["max_epochs"]
        return f"the recipe trains {epochs} epoch{'s' * (epochs != 1)}; fewer than {limit} allowed"
    target, m = c["min_test_acc"], row["measured"]
    if m is None:
        n = row['recipe']['epochs']
        return (f"no comparable run in {report['runs_dir']} (the whole training set, "
                f"{'all ' + str(n) + ' epochs' if n != 1 else 'the 1 epoch'} of the iteration's recipe): train one with "
                f"'mnistkit train {row['id']}'{earlier_version(row)}")
    seeds = ", ".join(str(s) for s in m["seeds"])
    if check == "test_acc":
        finals = ", ".join(f"{s['test_acc']:.2f}%" for s in m["per_seed"])
        return (f"{value['passed']} of {value['of']} seeds ({seeds}) reached {target}% final test accuracy "
                f"({finals}; min {m['test_acc']['min']:.2f}%)")
    n = report["consistent_epochs"]
    return (f"{value['passed']} of {value['of']} seeds ({seeds}) held {target}% test accuracy in each of "
            f"their last {n} epochs")
