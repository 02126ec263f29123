"""`sweep`: many trainings at once, locally or on Ray."""

from __future__ import annotations

import shlex
import sys
from typing import Optional

import typer

from mnistkit.cli.app import app, handles_errors, examples, print_json, fail, recipe_settings, SET, THREADS
from mnistkit.recipe import DEFAULT_RUNS_DIR


@app.command("sweep", epilog=examples("mnistkit sweep examples/sweep-i3-lr.yaml",
                                      "mnistkit sweep spec.yaml --workers 1",
                                      "mnistkit sweep spec.yaml --set epochs=2 --threads 1",
                                      "mnistkit sweep spec.yaml --ray HEAD:6379",
                                      "mnistkit sweep spec.yaml --resume",
                                      "mnistkit sweep spec.yaml --report --format markdown"))
@handles_errors
def sweep_cmd(
    spec_file: str = typer.Argument(..., metavar="SPEC.yaml", help="The sweep spec: models, seeds, grid or random, recipe, data."),
    runs_dir: str = typer.Option(DEFAULT_RUNS_DIR, "--runs-dir", help="Trials go to RUNS_DIR/<sweep name>/."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1,
                                          help="Local worker processes (default: one per core; torch threads are split "
                                               "between them)."),
    ray: Optional[str] = typer.Option(None, "--ray", metavar="auto|ADDRESS|local",
                                      help="Run the trials as Ray tasks: auto (the cluster this machine belongs to), "
                                           "HEAD:6379, or local (an embedded Ray)."),
    resume: bool = typer.Option(False, "--resume", help="Run only what is missing: finished trials are skipped, "
                                                        "interrupted ones resumed."),
    report_only: bool = typer.Option(False, "--report", help="Only print the table of the trials done so far."),
    fmt: Optional[str] = typer.Option(None, "--format", "-f", help="table (default), markdown, json or csv."),
    as_json: bool = typer.Option(False, "--json", help="The same as --format json."),
    device: str = typer.Option("auto", "--device", help="Device for every trial, as train's: auto (cuda, then mps, "
                                                        "then cpu), cpu, cuda, cuda:N or mps."),
    settings: Optional[list[str]] = SET,
    threads_n: Optional[int] = THREADS,
) -> None:
    """Many trainings at once: a grid or random search of recipes over seeds, locally or on Ray."""
    import time

    from mnistkit import render
    from mnistkit.errors import UsageError
    from mnistkit.sweeps.sweep import default_workers, load_spec, run_sweep, sweep_report

    formats = ("table", "markdown", "json", "csv")
    fmt = "json" if as_json else (fmt or "table").lower()
    if fmt not in formats:
        raise UsageError(f"unknown format {fmt!r}; choose one of: {', '.join(formats)}")
    spec = load_spec(spec_file, settings=recipe_settings(settings))
    seconds = None
    if not report_only:
        err = render.stderr()
        err.print(render.Text(f"sweep {spec.name}: {len(spec.trials)} trials into {runs_dir}/{spec.name}/ "
                              f"({'Ray: ' + ray if ray else f'{workers or default_workers()} local worker(s)'})",
                              style="dim"))

        def said(record: dict, n: int) -> None:
            status = record["status"] + (" (already done)" if record.get("skipped") else "")
            line = f"[{n}/{len(spec.trials)}] {record['trial']}: {status}"
            if record.get("error") and record["status"] != "finished":
                line += f": {record['error']}"
            err.print(render.Text(line, style="red" if record["status"] in ("failed", "diverged") else ""),
                      highlight=False, soft_wrap=True)

        from mnistkit.runs import Terminated, sigterm_as_interrupt

        t0 = time.perf_counter()
        try:
            with sigterm_as_interrupt():   # SIGTERM stops the trials as cleanly as Ctrl-C
                last_records = run_sweep(spec, runs_dir, workers=workers, ray=ray, device=device, resume=resume,
                                         on_result=said, keep_memory=True, threads=threads_n)
        except KeyboardInterrupt as exc:
            what, code = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
            fail(f"{what}; every trial stopped after its last finished epoch; run only what is missing with: "
                 f"mnistkit sweep {shlex.quote(spec_file)} --resume", code)
        seconds = time.perf_counter() - t0
    records = []
    if not report_only:
        records = last_records
    report = sweep_report(spec, runs_dir)
    if seconds is not None:
        report["wall_seconds"] = round(seconds, 1)
    if fmt == "json":
        print_json(report)
    elif fmt == "markdown":
        sys.stdout.write(render.sweep_markdown(report))
    elif fmt == "csv":
        sys.stdout.write(render.sweep_csv(report))
    else:
        out = render.stdout()
        out.print(render.sweep_table(report, out))
        if seconds is not None:
            out.print(render.Text(f"wall time {seconds:.1f} s"))
    bad = [r for r in records if r["status"] != "finished"]
    if bad:
        fail(f"{len(bad)} of {len(records)} trials did not finish ({', '.join(sorted({r['status'] for r in bad}))}); "
             f"the others are in {runs_dir}/{spec.name}/", 1)
