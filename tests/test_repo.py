"""The README's commands and CI stay in step: CI runs exactly the README's test command."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def _readme_command(marker: str) -> str:
    """The first line of the fenced block that follows ``marker`` in README.md."""
    match = re.search(re.escape(marker) + r".*?```(?:bash|sh)?\n(.+?)\n", _read("README.md"), re.S)
    assert match, f"README.md has no command block after {marker!r}"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = _readme_command("<!-- test-command -->")
    assert "pytest" in command
    assert command in _read(".ci/run").splitlines()


def test_readme_start_command_starts_the_dashboard():
    command = _readme_command("<!-- start-command -->")
    assert command.endswith("streamlit run app/main.py")


def test_setup_never_asks_for_an_unpinned_torch_first():
    # With no torch installed, a plain `torch` requirement pulls the newest CUDA build; both
    # README commands install the pinned wheel before requirements.txt is read.
    for marker in ("<!-- start-command -->", "<!-- test-command -->"):
        command = _readme_command(marker)
        assert command.index("torch==2.13.0") < command.index("requirements.txt")


def test_no_streamlit_pages_folder_beside_the_entry_point():
    # A folder named pages/ beside app/main.py is Streamlit's older multipage app: a fresh
    # server then runs a linked page (/compare) alone, without main.py's navigation and sidebar.
    assert not os.path.exists(os.path.join(ROOT, "app", "pages"))
