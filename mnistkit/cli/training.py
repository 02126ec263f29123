"""`train`: one run, several seeds, every iteration, or a resumed run; `lr-find`: the LR range test."""

from __future__ import annotations

import shlex
from typing import Any, Callable, Optional

import typer

from mnistkit.cli.app import (app, handles_errors, examples, note, print_json, recipe_settings, say, DEFAULTS,
                              EXPERIMENTS, MODEL_ARG, MODEL_CODE, MODEL_HELP, SET, THREADS)
from mnistkit.recipe import DEFAULT_RUNS_DIR, Backend, Dataset, Precision


@app.command("train", epilog=examples(
    "mnistkit train I3                                 an iteration with its change-log recipe",
    "mnistkit train I1 --seeds 3 --data-dir ../mnist   seeds 1, 2, 3; mean ± std at the end",
    "mnistkit train I3 --val 10000                     best epoch chosen on 10,000 held-out images",
    "mnistkit train S1                                 your change-log's iteration S1 (its model and recipe)",
    "mnistkit train models.py:Net --model-arg width=12 a model of your own, the default recipe",
    "mnistkit train I3 --set weight_decay=1e-4 --set augment.degrees=7   any recipe key over the change-log's",
    "mnistkit train I5 --teacher I3                    distil I5 from I3's best comparable run",
    "mnistkit train --resume runs/I3-20261125-101500   continue an interrupted run"))
@handles_errors
def train_cmd(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP + " Default: the change-log's final iteration."),
    model_arg: Optional[list[str]] = MODEL_ARG,
    model_code: Optional[str] = MODEL_CODE,
    epochs: Optional[int] = typer.Option(None, "--epochs", "-e", min=1, help="Epochs (default: the iteration's recipe)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", "-b", min=1,
                                             help=f"Training batch size (default: the recipe's; {DEFAULTS.batch_size} "
                                                  "unless the change-log says otherwise)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Maximum learning rate (OneCycleLR) or initial LR (StepLR)."),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help=f"Random seed (default: {DEFAULTS.seed})."),
    seeds: Optional[str] = typer.Option(None, "--seeds", metavar="N|LIST",
                                        help="Train once per seed: a count (3 = seeds 1, 2, 3) or a list (1,2,42); "
                                             "ends with mean ± std."),
    precision: Optional[Precision] = typer.Option(None, "--precision", case_sensitive=False,
                                                  help="The training step's precision (default: auto = bf16 where "
                                                       "the hardware has it natively)."),
    backend: Optional[Backend] = typer.Option(None, "--backend", case_sensitive=False,
                                              help="How the step computes: auto (the default: fused where mnistkit's "
                                                   "C kernel builds, else torch), torch (PyTorch's ops) or fused "
                                                   "(BatchNorm + ReLU in the kernel; CPU)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps; auto picks cuda, then mps, then cpu."),
    dataset: Dataset = typer.Option(Dataset.mnist, "--dataset", case_sensitive=False,
                                    help="mnist, or synthetic (made locally, no download)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files "
                                           "(default: $MNISTKIT_DATA, else ~/.cache/mnistkit; downloaded if absent)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use only the first N training images "
                                        "(a shortened run: compare never counts it)."),
    val: int = typer.Option(0, "--val", min=0, help="Hold out N training images (a fixed draw) to choose the best "
                                                     "epoch on; the test set is then only reported."),
    runs_dir: str = typer.Option(DEFAULT_RUNS_DIR, "--runs-dir", help="Where run folders are written."),
    experiments: Optional[str] = EXPERIMENTS,
    resume: Optional[str] = typer.Option(None, "--resume", metavar="RUN", help="Continue an interrupted run from its folder."),
    all_iterations: bool = typer.Option(False, "--all", help="Train every iteration of the change-log, each with its own recipe."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout at the end."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress display and no per-epoch rows."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also write TensorBoard event files into the run "
                                     "folder (tensorboard --logdir runs); needs mnistkit[tensorboard]."),
    teacher: Optional[str] = typer.Option(None, "--teacher", metavar="RUN|ITERATION",
                                          help="Distil from a teacher: a finished run's folder, or an iteration (its "
                                               "best comparable run); the loss mixes in its softened outputs "
                                               "(--set distill_alpha=0.5 --set distill_temperature=4)."),
    settings: Optional[list[str]] = SET,
    threads_n: Optional[int] = THREADS,
) -> None:
    """Train a model with its iteration's recipe from the change-log (a model of your own too)."""
    from mnistkit import render
    from mnistkit.backends.memory import keep_freed_memory, release_memory
    from mnistkit.errors import UsageError
    from mnistkit.experiments import find_experiments
    from mnistkit.training.plan import make_plan, parse_seeds, train_plan
    from mnistkit.recipe import DataOptions
    from mnistkit.training.loop import resume as resume_run

    console = render.stderr() if as_json else render.stdout()
    pending: list[str] = []  # said on stderr once training starts, so that an error stays one line

    def run(call: Callable, *args: Any, **kwargs: Any) -> dict:
        from mnistkit.training.tensorboard import Callbacks, TensorBoard

        callbacks = Callbacks(TensorBoard() if tensorboard else None,
                              render.TrainDisplay(console, quiet=quiet, preamble=list(pending)))
        pending.clear()
        result = call(*args, callback=callbacks, **kwargs).to_dict()   # the fit closes its callbacks, however it ends
        if not quiet:
            console.print(render.train_result(result), highlight=False)
        return result

    def seeds_done(name: str, group: list[dict]) -> None:
        if len(group) > 1 and not quiet:
            console.print(render.seeds_table(group, plan.experiments.constraints.get("min_test_acc")))

    if resume is not None:
        given = [name for name, v in (("MODEL", model), ("--all", all_iterations or None), ("--epochs", epochs),
                                      ("--batch-size", batch_size), ("--lr", lr), ("--seed", seed), ("--seeds", seeds),
                                      ("--limit", limit), ("--val", val or None), ("--data-dir", data_dir),
                                      ("--precision", precision), ("--backend", backend),
                                      ("--experiments", experiments), ("--model-arg", model_arg or None),
                                      ("--set", settings or None), ("--threads", threads_n), ("--teacher", teacher))
                 if v is not None]
        if given:
            raise UsageError(f"--resume continues a run with its own recipe and data; drop {', '.join(given)}")
    elif model_code is not None:
        raise UsageError("--model-code names the Python file of a run's model: it goes with --resume")
    elif seed is not None and seeds is not None:
        raise UsageError("give --seed or --seeds, not both")
    elif seeds is not None and any(str(pair).partition("=")[0].strip() == "seed" for pair in settings or []):
        raise UsageError("give --seeds or --set seed=..., not both")
    elif all_iterations and model is not None:
        raise UsageError("--all trains every iteration; drop MODEL")
    if tensorboard:
        from mnistkit.training.tensorboard import require_tensorboard

        require_tensorboard()   # before anything is trained or written
    keep_freed_memory()   # the CLI's process only: each step's buffers are reused, not faulted in anew
    try:
        if resume is not None:
            result = run(resume_run, resume, device=device, model_code=model_code)
            if as_json:
                print_json(result)
            return
        from mnistkit.training.device import threads
        from mnistkit.usermodels.modelref import parse_model_args

        overrides = recipe_settings(settings, {"epochs": ("--epochs", epochs),
                                               "batch_size": ("--batch-size", batch_size),
                                               "lr": ("--lr", lr), "seed": ("--seed", seed),
                                               "precision": ("--precision", precision),
                                               "backend": ("--backend", backend),
                                               "teacher": ("--teacher", teacher)})
        plan = make_plan(find_experiments(experiments), model, all_iterations,
                         parse_seeds(seeds) if seeds is not None else [seed], parse_model_args(model_arg or []) or None)
        pending += [plan.experiments.described, *plan.notes]
        with threads(threads_n):
            results = train_plan(plan, DataOptions(dataset.value, data_dir, limit, val), overrides, device, runs_dir,
                                 run=run, on_group=seeds_done)
    finally:
        release_memory()
    if as_json:
        path = str(plan.experiments.path)
        print_json({**results[0], "experiments": path} if len(results) == 1 else {"experiments": path, "runs": results})


@app.command("lr-find", epilog=examples(
    "mnistkit lr-find I3 --data-dir ../mnist                 the LR range test with I3's recipe; lr-find.png",
    "mnistkit lr-find models.py:Net -o net-lr.png            a model of your own",
    "mnistkit lr-find I3 --set batch_size=256 --json         another recipe key; the curve as JSON",
    "mnistkit lr-find I3 --steps 100 --threads 1 --no-plot   shorter, on one core, no picture"))
@handles_errors
def lr_find_cmd(
    model: Optional[str] = typer.Argument(None, help=MODEL_HELP + " Default: the change-log's final iteration."),
    model_arg: Optional[list[str]] = MODEL_ARG,
    steps: int = typer.Option(200, "--steps", min=2, max=10_000, help="Training steps at most: the LR rises "
                              "exponentially over them (the test stops earlier where the loss diverges)."),
    start_lr: float = typer.Option(1e-4, "--start-lr", help="The first step's LR."),
    end_lr: float = typer.Option(10.0, "--end-lr", help="The last step's LR."),
    settings: Optional[list[str]] = SET,
    threads_n: Optional[int] = THREADS,
    output: Optional[str] = typer.Option(None, "--output", "-o", help="The picture to write (default: lr-find.png; "
                                         "needs mnistkit[plot])."),
    no_plot: bool = typer.Option(False, "--no-plot", help="Draw no picture."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps; auto picks cuda, then mps, "
                                                        "then cpu."),
    dataset: Dataset = typer.Option(Dataset.mnist, "--dataset", case_sensitive=False,
                                    help="mnist, or synthetic (made locally, no download)."),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="Folder with the MNIST IDX files "
                                           "(default: $MNISTKIT_DATA, else ~/.cache/mnistkit; downloaded if absent)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Use only the first N training images."),
    experiments: Optional[str] = EXPERIMENTS,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout: the curve (lr, loss, "
                                                       "smoothed), the suggestion and its rule."),
) -> None:
    """The LR range test: a fresh copy of the model trains while the LR rises; suggests OneCycle's max_lr (min/10)."""
    from mnistkit import render
    from mnistkit.training.device import threads
    from mnistkit.errors import MnistkitError, UsageError
    from mnistkit.experiments import find_experiments, resolve_recipe
    from mnistkit.training.lrfind import check_options, lr_find
    from mnistkit.usermodels.modelref import parse_model_args
    from mnistkit.files.outputs import check_outputs, write_output
    from mnistkit.training.plan import make_plan
    from mnistkit.recipe import DataOptions
    from mnistkit.render.lrfind import LRFindDisplay, lr_find_png, lr_find_text

    if no_plot and output is not None:
        raise UsageError("give --output or --no-plot, not both")
    check_options(steps, start_lr, end_lr)
    exp = find_experiments(experiments)
    plan = make_plan(exp, model, False, [None], parse_model_args(model_arg or []) or None)
    source = plan.models[0]
    given = recipe_settings(settings)
    recipe = resolve_recipe(source, exp).with_settings(given)
    picture = None if no_plot else (output or "lr-find.png")
    if picture is not None:
        try:
            render.pyplot()
        except MnistkitError:
            if output is not None:
                raise
            picture = None
            note("no picture: matplotlib is not installed (pip install 'mnistkit[plot]'); the curve is in --json")
        if picture is not None:
            check_outputs([picture], inputs=tuple(p for p in (exp.path, source.path) if p))
    err = render.stderr()
    for line in (exp.described, *plan.notes):
        say(line)
    from mnistkit.backends.memory import keep_freed_memory, release_memory

    display = LRFindDisplay(err)
    keep_freed_memory()   # as train: each step's buffers are reused, not faulted in anew
    try:
        with threads(threads_n):
            result = lr_find(source, recipe, DataOptions(dataset.value, data_dir, limit), device, steps=steps,
                             start_lr=start_lr, end_lr=end_lr, on_step=display.on_step)
    finally:
        display.close()
        release_memory()
    data = result.to_dict()
    it = exp.iteration_of(source)
    data["recipe_line"] = result.recipe_line(it.recipe if it is not None else None, given)
    data["iteration"] = it.id if it is not None else None
    data["experiments"] = str(exp.path)
    if result.suggestion.lr is not None:   # the same recipe for one run, from the command line
        data["train_command"] = " ".join(["mnistkit train", shlex.quote(model or source.name),
                                          *(f"--model-arg {shlex.quote(a)}" for a in model_arg or []),
                                          *(f"--set {shlex.quote(str(p))}" for p in settings or []
                                            if str(p).partition("=")[0].strip() != "lr"),
                                          f"--lr {result.suggestion.lr:g}"])
    if picture is not None:
        write_output(picture, lr_find_png(data))
        data["picture"] = picture
    where = (f"{exp.path}, iteration {it.id} (in place of its recipe line; the file is not edited)"
             if it is not None else f"your change-log, in the iteration that trains {source.shown}")
    if as_json:
        print_json(data)
    else:
        render.stdout().print(lr_find_text(data, data["recipe_line"], where), highlight=False)
    if picture is not None:
        say(f"wrote {picture}")
