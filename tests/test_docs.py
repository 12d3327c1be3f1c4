"""The API docstring's example runs (on the CPU)."""

import doctest

import tvm_fused.api


def test_api_docstring_example():
    results = doctest.testmod(tvm_fused.api, extraglobs={"torch": __import__("torch")})
    assert results.attempted > 0 and results.failed == 0


def test_ci_runs_the_readmes_set_up_commands_verbatim():
    """The README's two set-up commands (after the virtual environment) are what CI runs
    first, word for word, before it installs anything more."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme.split("## Set up", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    venv, *commands = block.strip().splitlines()
    assert "venv" in venv and len(commands) == 2
    ci = [line.split("  #")[0].strip() for line in (root / ".ci/run").read_text().splitlines()]
    first_install = next(i for i, line in enumerate(ci) if "-e " in line)
    assert ci[first_install:first_install + 2] == commands
