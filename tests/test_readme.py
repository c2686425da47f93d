"""README.md and docs/*.md: every snippet runs as written, prints what it shows, and every link resolves.

Python blocks are runnable unless the line before their fence is the marker
``<!-- not run: <reason> -->``: each runs in a fresh namespace, as a script would, from a
temporary directory, and must print. A block written for ``torchrun`` runs as the single
process plain ``python`` gives (no torchrun environment); the slow test below also runs it
under ``torchrun`` with two processes. Shell blocks are checked without installing anything:
each command exists, the files and extras they name exist, ``python -m`` modules answer
``--help``. Every relative link (and its ``#anchor``) resolves to a file of the repository.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
NOT_RUN = re.compile(r"<!-- not run: .+ -->\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
INLINE_CODE = re.compile(r"`[^`\n]*`")
RUNNABLE_LANGUAGES = ("python", "bash", "sh", "shell")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _blocks(languages: tuple[str, ...]) -> list[tuple[str, str]]:
    """(``file:line`` of the fence, code) of each block in one of ``languages`` that runs."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            if m.group(1) in languages and not NOT_RUN.match(before):
                found.append((f"{_name(path)}:{text.count(chr(10), 0, m.start()) + 1}", m.group(2)))
    return found


PYTHON_BLOCKS = _blocks(("python",))
SHELL_BLOCKS = _blocks(("bash", "sh", "shell"))
TORCHRUN_BLOCKS = [(where, code) for where, code in PYTHON_BLOCKS if "torchrun" in code]


def test_the_docs_have_the_blocks_this_test_expects():
    names = {where.split(":")[0] for where, _ in PYTHON_BLOCKS}
    assert {"README.md", "docs/porting.md", "docs/layers.md", "docs/guide.md", "docs/distributed.md"} <= names
    assert len(TORCHRUN_BLOCKS) == 1 and SHELL_BLOCKS
    for path in DOCS:
        for language, _ in FENCE.findall(path.read_text()):
            assert language in (*RUNNABLE_LANGUAGES, "text", ""), f"{_name(path)}: a ```{language} block"


def test_the_readme_opens_with_a_short_quick_start():
    text = (ROOT / "README.md").read_text()
    assert "DESIGN.md" not in text  # the design notes live in docs/, in the repository
    start = text.index("## Quick start")
    quick_start = text[start: text.index("\n## ", start + 1)]
    assert len(quick_start.strip().splitlines()) < 25
    for needed in ("venv", "python -m snnorm.demo", "bash tests/run.sh", "TRITON_INTERPRET=1",
                   'pip install -e ".[triton]"', "print("):
        assert needed in quick_start, needed
    assert text.index("## Quick start") < 1200  # on the first screen


@pytest.mark.parametrize("where, code", PYTHON_BLOCKS, ids=[where for where, _ in PYTHON_BLOCKS])
def test_python_block_runs_and_prints(where, code, tmp_path, monkeypatch):
    assert "print(" in code, f"{where}: a snippet prints what it shows"
    monkeypatch.chdir(tmp_path)  # whatever a block writes stays out of the repository
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)  # as plain `python` runs it, outside torchrun
    namespace = {"__name__": "__main__"}
    if "TRITON_INTERPRET" in code and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # triton was imported here compiling for a GPU: the interpreter the block asks for needs a fresh process
        result = subprocess.run([sys.executable, "-W", "error::UserWarning", "-c", code], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert result.returncode == 0, f"{where}: {result.stderr[-3000:]}"
        printed = result.stdout
    else:
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), warnings.catch_warnings():
                for category in (UserWarning, RuntimeWarning):  # a snippet a new user copies shows no warning
                    warnings.simplefilter("error", category)
                exec(compile(code, where, "exec"), namespace)
        finally:
            if dist.is_available() and dist.is_initialized():  # a failing block must not leak its group
                dist.destroy_process_group()
        printed = out.getvalue()
    assert printed.strip(), f"{where} printed nothing"
    print(printed)
    if "x_seq" in namespace:  # the porting example: spikes of the documented shape
        y = namespace["y"]
        assert y.shape[:2] == namespace["x_seq"].shape[:2]
        assert set(y.unique().tolist()) <= {0.0, 1.0}
    for shown, expected in CLAIMS.items():  # what a snippet says it shows, it shows
        if shown in code:
            assert expected in printed, f"{where} printed {printed!r}, not {expected!r}"


#: a snippet that prints the first string shows the second
CLAIMS = {
    "differing on triton:": "differing on triton: 0\n",  # the quick start: both backends, the same spikes
    "same spikes:": "same spikes: True",
    "same state_dict keys:": "same state_dict keys: True",
    "spikes changed by folding:": "spikes changed by folding: 0 of",
    "print(lif.backend": "triton True",
    "batches counted once:": "batches counted once: 1 ",
    "torch.allclose(bntt(x), per_step)": "True\n",
}


@pytest.mark.slow  # two processes under torchrun, and plain python in a subprocess
@pytest.mark.timeout(600)
@pytest.mark.parametrize("where, code", TORCHRUN_BLOCKS, ids=[where for where, _ in TORCHRUN_BLOCKS])
def test_multi_process_block_runs_under_torchrun_and_plain_python(where, code, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    runs = {"python": [sys.executable, str(script)],
            "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         str(script)]}
    for how, argv in runs.items():
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{how}: {result.stderr[-3000:]}"
        ranks = 2 if how == "torchrun" else 1
        assert sum("loss" in line for line in result.stdout.splitlines()) >= ranks, (how, result.stdout)


# -- links ---------------------------------------------------------------------------------
def _repo_files() -> set[str]:
    """Files of the repository: tracked, or new and not ignored (falls back to the tree)."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        return {str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if p.is_file()}
    return set(listed.splitlines())


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    text = FENCE.sub("", path.read_text())
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", "")).replace(" ", "-")
        anchors.add(slug)
    return anchors


def _links() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        prose = INLINE_CODE.sub("", FENCE.sub("", path.read_text()))  # `bntt[t](x)` is code, not a link
        for target in LINK.findall(prose):
            if not re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not files
                found.append((_name(path), target))
    return found


def test_every_relative_link_resolves_to_a_file_in_the_repository():
    files = _repo_files()
    links = _links()
    assert len(links) > 10
    broken = []
    for source, target in links:
        file_part, _, anchor = target.partition("#")
        path = (ROOT / source).parent / file_part if file_part else ROOT / source
        try:
            relative = str(path.resolve().relative_to(ROOT))
        except ValueError:
            broken.append(f"{source}: {target} (outside the repository)")
            continue
        if relative not in files:
            broken.append(f"{source}: {target} (no such file in the repository)")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{source}: {target} (no heading #{anchor})")
    assert not broken, "\n".join(broken)


# -- shell blocks -----------------------------------------------------------------------------
def _commands(code: str):
    for raw in code.splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        for command in re.split(r"&&|\|\||;", line):
            argv = shlex.split(command)
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):  # VAR=value command
                argv = argv[1:]
            if argv:
                yield argv


def _declared_extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, re.M))


def _check_command(argv: list[str], capsys, monkeypatch) -> None:
    if argv[0] in ("source", "."):  # a shell builtin: the venv's activate script, made by `python -m venv`
        assert argv[1].endswith("bin/activate"), argv
        return
    assert shutil.which(argv[0]), f"{argv[0]} is not on PATH"
    if argv[0] == "bash":
        script = ROOT / argv[1]
        assert script.is_file(), f"{argv[1]} does not exist"
        subprocess.run(["bash", "-n", str(script)], check=True)  # parses
    elif argv[0] in ("pip", "pip3") and argv[1] == "install":
        extras_declared = _declared_extras()
        for arg in argv[2:]:
            extras = re.fullmatch(r"\.\[([\w,]+)\]", arg)
            if extras:
                missing = set(extras.group(1).split(",")) - set(extras_declared)
                assert not missing, f"pyproject.toml declares no extra {missing}"
    elif argv[0] in ("python", "python3") and argv[1] == "-m":
        module = argv[2]  # run in-process with --help (the real run is the module's own test)
        monkeypatch.setattr("sys.argv", [module, "--help"])
        monkeypatch.delitem(sys.modules, module, raising=False)  # run it as python -m would: fresh
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
        assert exit_info.value.code == 0
        assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("where, code", SHELL_BLOCKS, ids=[where for where, _ in SHELL_BLOCKS])
def test_shell_block_commands_exist(where, code, capsys, monkeypatch):
    commands = list(_commands(code))
    assert commands
    for argv in commands:
        _check_command(argv, capsys, monkeypatch)
