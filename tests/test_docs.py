"""Docs that cannot rot: every `mnistkit ...` command in a bash block of README.md, docs/ and
bench/README.md runs (offline: on synthetic digits, in a temporary folder, one epoch where it
trains, 20 steps for lr-find), every option any page names exists in that command, and every relative link and anchor
resolves."""

import glob
import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.main import get_command

from mnistkit.cli import app

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "bench" / "README.md",
         *sorted((ROOT / "docs").glob("*.md"))]
DOCUMENTED = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# commands shown that cannot run here, and why (everything else in a bash block runs)
OFFLINE = {
    "mnistkit sweep spec.yaml --ray HEAD:6379": "needs a Ray cluster at HEAD (tests/test_sweep.py starts a real head)",
}
# placeholders a page uses for a file of the reader's own
FILES = {"my-digit.png": "examples/three.png"}
TRAINING = ["--dataset", "synthetic", "--limit", "128", "--epochs", "1", "--device", "cpu", "--quiet"]


def bash_commands(page: Path) -> list[list[str]]:
    """The `mnistkit` lines of each bash block, a block being one script (cd carries over)."""
    scripts = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S):
        lines = []
        for line in block.splitlines():
            line = re.sub(r"\s#.*$", "", line).strip()
            if line.startswith("mnistkit "):
                lines.append(line)
        if lines:
            scripts.append(lines)
    return scripts


def shown_commands(page: Path) -> list[str]:
    """Every `mnistkit ...` a page shows: bash blocks and inline code."""
    text = page.read_text()
    inline = re.findall(r"`(mnistkit [^`]+)`", text)
    blocks = [line for script in bash_commands(page) for line in script]
    return blocks + inline


def offline_args(tokens: list[str], cwd: Path) -> list[str]:
    """The command as the test runs it: trainings shortened to one epoch on synthetic digits, sweeps
    asked for their report only (their specs train on real MNIST), globs expanded, the reader's own
    files replaced by the examples."""
    args, skip = [], False
    for i, t in enumerate(tokens):
        if skip:
            skip = False
            continue
        if t in ("--data-dir", "--epochs", "--seeds") and tokens[0] == "train" or \
                t in ("--data-dir", "--steps") and tokens[0] == "lr-find":
            skip = True
            continue
        if t in FILES:
            t = str(ROOT / FILES[t])
        elif any(c in t for c in "*?["):
            matches = sorted(glob.glob(str(cwd / t)))
            assert matches, f"{t} matches nothing in {cwd}"
            t = matches[-1]
        args.append(t)
    if args[0] == "train" and "--resume" not in args:
        args += TRAINING
    if args[0] == "sweep":
        args.append("--report")
    if args[0] == "lr-find":   # a short test on synthetic digits
        args += ["--dataset", "synthetic", "--limit", "256", "--steps", "20", "--device", "cpu"]
    return args


_TRAINED: set[tuple[str, ...]] = set()   # trainings already run by an earlier page: shown twice, run once


def run_script(runner, lines: list[str], cwd: Path, monkeypatch) -> list[str]:
    ran = []
    for line in lines:
        if line in OFFLINE:
            continue
        for part in (p.strip() for p in line.split("&&")):
            tokens = shlex.split(part)
            if tokens[0] == "cd":
                cwd = cwd / tokens[1]
                monkeypatch.chdir(cwd)
                continue
            assert tokens[0] == "mnistkit", part
            args = offline_args(tokens[1:], cwd)
            if args[0] == "train":   # the same training into another runs folder teaches nothing new
                key = tuple(a for i, a in enumerate(args) if a != "--runs-dir" and args[i - 1] != "--runs-dir")
                if key in _TRAINED and "--runs-dir" in args:
                    continue
                _TRAINED.add(key)
            result = runner.invoke(app, args)
            allowed = (0, 1) if args[0] == "check" else (0,)   # check's contract: 1 = a constraint fails
            assert result.exit_code in allowed, (part, args, result.output[-3000:])
            assert "Traceback" not in result.output, (part, result.output[-3000:])
            ran.append(part)
    return ran


_SCRIPTS: set[tuple[str, ...]] = set()   # a script two pages show (the tour) runs once


@pytest.mark.slow
@pytest.mark.parametrize("page", DOCUMENTED, ids=[str(p.relative_to(ROOT)) for p in DOCUMENTED])
def test_every_command_in_a_bash_block_runs(page, runner, tmp_path, monkeypatch):
    scripts = [lines for lines in bash_commands(page) if tuple(lines) not in _SCRIPTS]
    _SCRIPTS.update(tuple(lines) for lines in scripts)
    if not scripts:
        pytest.skip(f"{page.name} shows no mnistkit command in a bash block that another page did not show")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")   # pages run from the repository's root
    for n, lines in enumerate(scripts):
        cwd = tmp_path
        monkeypatch.chdir(cwd)
        assert run_script(runner, lines, cwd, monkeypatch) or all(line in OFFLINE for line in lines)


def _options(command) -> set[str]:
    opts = {"--help", "-h"}
    for p in command.params:
        opts.update(p.opts)
        opts.update(p.secondary_opts)
    return opts


def test_every_option_a_page_names_exists():
    group = get_command(app)
    root = _options(group) | {"--install-completion", "--show-completion"}
    checked = 0
    for page in PAGES:
        for shown in shown_commands(page):
            tokens = shlex.split(shown.replace("...", ""), comments=True)[1:]
            name = next((t for t in tokens if not t.startswith("-")), None)
            command = group.commands.get(name) if name else None
            known = root | (_options(command) if command is not None else set())
            if name and command is None and not tokens[0].startswith("-"):
                pytest.fail(f"{page.name}: `{shown}` names no mnistkit command")
            for t in tokens:
                if t.startswith("-") and not re.fullmatch(r"-\d.*", t):
                    assert t.split("=")[0] in known, f"{page.name}: `{shown}`: {t} is not an option of it"
                    checked += 1
    assert checked > 50


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*_\[\]()]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_every_relative_link_and_anchor_resolves():
    pages = PAGES + [ROOT / "examples" / "report" / "README.md"]
    checked = 0
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.relative_to(ROOT)}: link to {target}: no such file"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", file.read_text(), re.M)
                assert anchor in {_slug(h) for h in headings}, f"{page.relative_to(ROOT)}: no anchor #{anchor} in {path}"
            checked += 1
    assert checked > 20


def test_the_readme_is_short_and_ci_runs_its_test_command():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    assert "make test" in readme and "make test" in (ROOT / ".ci" / "run").read_text()
