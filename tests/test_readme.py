"""The README's test command is the one CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = ROOT.joinpath("README.md").read_text()
    ci = [
        line
        for line in ROOT.joinpath(".ci", "run").read_text().splitlines()
        if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert ci[0] in readme and "pytest" in ci[0]
    assert ci[1:] == ["bash .ci/gpu-stack", "bash .ci/vllm"]  # stage 2: the GPU machine's software stack; 3: vLLM
    main_job = [line for line in readme.splitlines() if line.endswith("-m minikv")]
    assert len(main_job) == 1 and main_job[0].startswith("python3 -m venv .venv")


def test_the_usage_snippet_runs_as_written(capsys):
    """The first Python block of "## Usage" (the embedded SmolLM2, the defaults) runs unchanged and
    answers; the model comes back unpatched."""
    readme = ROOT.joinpath("README.md").read_text()
    usage = readme[readme.index("## Usage") :]
    code = usage[usage.index("```python\n") + len("```python\n") :]
    code = code[: code.index("```")]
    scope: dict = {}
    exec(compile(code, "README.md:Usage", "exec"), scope)
    assert "Paris" in capsys.readouterr().out
    import minikv

    assert not minikv.is_patched(scope["model"])
