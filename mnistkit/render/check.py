"""``mnistkit check``: one line per check (text), a JUnit XML report (one test case per iteration
and check, which GitHub Actions and GitLab show), and the summary line. An exploratory
iteration's case that did not pass is a ``note`` line (JUnit: skipped), never a failure."""

from __future__ import annotations

from typing import TYPE_CHECKING
from xml.etree import ElementTree as ET

from mnistkit.render.common import clean, xml_text

if TYPE_CHECKING:  # pragma: no cover
    from mnistkit.results.check import Case, CheckReport


def check_line(case: "Case") -> str:
    if not case.gated:
        return (f"{'pass' if case.passed else 'note'}  {case.iteration} {case.check}: {case.detail} "
                f"(exploratory{'' if case.passed else ': not gated'})")
    return f"{'pass' if case.passed else 'FAIL'}  {case.iteration} {case.check}: {case.detail}"


def check_text(report: "CheckReport") -> str:
    return "".join(clean(check_line(c)) + "\n" for c in report.cases)


def check_verdict(report: "CheckReport") -> str:
    what = "static checks (no training)" if report.static else f"checks (runs: {report.runs_dir})"
    gated = report.gated
    whose = ""
    if len(gated) < len(report.cases):   # exploratory iterations were reported beside the gated ones
        whose = f" of the final iteration {report.final}"
        others = len(report.cases) - len(gated)
        missed = len(report.not_gated_failed)
        tail = (f"; exploratory iterations, not gated: {missed} of {others} checks not met" if missed else
                f"; exploratory iterations, not gated: all {others} checks met")
    else:
        tail = ""
    if report.passed:
        return f"all {len(gated)} {what}{whose} passed{tail} ({report.experiments})"
    return f"{len(report.failed)} of {len(gated)} {what}{whose} failed{tail} ({report.experiments})"


def check_junit(report: "CheckReport") -> str:
    suites = ET.Element("testsuites", name="mnistkit check", tests=str(len(report.cases)),
                        failures=str(len(report.failed)), skipped=str(len(report.not_gated_failed)))
    by_iteration: dict[str, list["Case"]] = {}
    for case in report.cases:
        by_iteration.setdefault(case.iteration, []).append(case)
    for iteration, cases in by_iteration.items():
        suite = ET.SubElement(suites, "testsuite", name=xml_text(iteration), tests=str(len(cases)),
                              failures=str(sum(c.gated and not c.passed for c in cases)), errors="0",
                              skipped=str(sum(not c.gated and not c.passed for c in cases)))
        for case in cases:
            tc = ET.SubElement(suite, "testcase", classname=xml_text(f"mnistkit.results.check.{iteration}"),
                               name=xml_text(case.check))
            detail = xml_text(case.detail)   # a change-log's text may hold what XML 1.0 forbids
            if case.passed:
                ET.SubElement(tc, "system-out").text = detail
            elif not case.gated:
                ET.SubElement(tc, "skipped", message=xml_text(f"exploratory iteration, not gated: {case.detail}"))
            else:
                ET.SubElement(tc, "failure", message=detail, type="constraint").text = detail
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, encoding="unicode") + "\n"
