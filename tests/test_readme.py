"""Every code block in README.md runs as written.

Python blocks are executed, each in a fresh namespace, as a script would be. A block
written for ``torchrun`` gets the environment torchrun gives a single process (rank 0
of a world of 1). Shell blocks are checked without installing anything: each command
exists, the files and extras they name exist, ``python -m`` modules answer ``--help``.
"""

from __future__ import annotations

import re
import runpy
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(language: str) -> list[tuple[int, str]]:
    text = README.read_text()
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(2))
        for m in FENCE.finditer(text)
        if m.group(1) == language
    ]


PYTHON_BLOCKS = _blocks("python")
SHELL_BLOCKS = _blocks("bash") + _blocks("sh") + _blocks("shell")


def test_readme_has_the_blocks_this_test_expects():
    assert len(PYTHON_BLOCKS) >= 2 and len(SHELL_BLOCKS) >= 2
    assert all(lang in ("python", "bash", "sh", "shell", "text", "")
               for lang, _ in FENCE.findall(README.read_text())), "a block in a language this test does not run"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("line, code", PYTHON_BLOCKS, ids=[f"README.md:{line}" for line, _ in PYTHON_BLOCKS])
def test_python_block_runs(line, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a block writes stays out of the repository
    if "torchrun" in code:
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                           ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
            monkeypatch.setenv(key, value)
    namespace = {"__name__": "__main__"}
    try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    finally:
        if dist.is_available() and dist.is_initialized():  # a failing block must not leak its group
            dist.destroy_process_group()
    if "torchrun" in code:
        assert namespace["loss"].isfinite()
    if "x_seq" in namespace:  # the porting example: spikes of the documented shape
        y = namespace["y"]
        assert y.shape[:2] == namespace["x_seq"].shape[:2]
        assert set(y.unique().tolist()) <= {0.0, 1.0}


def _commands(code: str):
    for raw in code.splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        for command in re.split(r"&&|\|\||;", line):
            yield shlex.split(command)


def _declared_extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([\w-]+)\s*=", section, re.M))


def _check_command(argv: list[str], capsys, monkeypatch) -> None:
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
        module = argv[2]  # run in-process with --help (the real run is the demo's own test)
        monkeypatch.setattr("sys.argv", [module, "--help"])
        monkeypatch.delitem(sys.modules, module, raising=False)  # run it as python -m would: fresh
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_module(module, run_name="__main__", alter_sys=False)
        assert exit_info.value.code == 0
        assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("line, code", SHELL_BLOCKS, ids=[f"README.md:{line}" for line, _ in SHELL_BLOCKS])
def test_shell_block_commands_exist(line, code, capsys, monkeypatch):
    commands = list(_commands(code))
    assert commands
    for argv in commands:
        _check_command(argv, capsys, monkeypatch)
