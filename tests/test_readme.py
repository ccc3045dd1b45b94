"""The README's test command is the one CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = ROOT.joinpath("README.md").read_text()
    ci = [line for line in ROOT.joinpath(".ci", "run").read_text().splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert len(ci) == 1 and ci[0] in readme
    assert "pytest" in ci[0]
    main_job = [line for line in readme.splitlines() if line.endswith("-m minikv")]
    assert len(main_job) == 1 and main_job[0].startswith("python3 -m venv .venv")
