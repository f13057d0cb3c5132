"""Ctrl-C and SIGTERM at the top level of the command-line programs (saffu.signals)."""

import ast
import subprocess
import sys

import pytest

from saffu.signals import EXIT_INTERRUPTED, exit_quietly_when_stopped, stop_requested
from sweep_helpers import REPO

# The programs that a researcher starts from a shell.
PROGRAMS = ["sweep.py", "analysis/archive.py", "analysis/export.py", "analysis/frontier.py", "analysis/report.py"]


def raise_interrupt() -> None:
    raise KeyboardInterrupt


def interrupt_then(error: BaseException) -> None:
    """Raise `error` while a KeyboardInterrupt is handled, as a library's cleanup does when
    an interrupt lands inside it, and as a program does that reports its interrupt itself."""
    try:
        raise_interrupt()
    except KeyboardInterrupt:
        raise error


@pytest.mark.parametrize(
    "action", [raise_interrupt, lambda: interrupt_then(AttributeError("half-built node"))],
    ids=["interrupt", "error-during-interrupt"],
)
def test_interrupt_exits_with_one_line(action, capsys):
    with pytest.raises(SystemExit) as caught:
        with exit_quietly_when_stopped("interrupted while starting; nothing was run"):
            action()
    assert caught.value.code == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "error: interrupted while starting; nothing was run\n"


@pytest.mark.parametrize(
    ("action", "code"),
    [(lambda: interrupt_then(SystemExit(EXIT_INTERRUPTED)), EXIT_INTERRUPTED), (lambda: sys.exit(0), 0),
     (lambda: sys.exit(2), 2), (lambda: int("x"), None)],
    ids=["reported-interrupt", "exit-0", "exit-2", "value-error"],
)
def test_other_exits_and_errors_pass(action, code, capsys):
    """Exits and errors not caused by an interrupt pass unchanged, and so does the status
    130 of a program that already reported its interrupt."""
    with pytest.raises(SystemExit if code is not None else ValueError) as caught:
        with exit_quietly_when_stopped("interrupted"):
            action()
    if code is not None:
        assert caught.value.code == code
    assert capsys.readouterr().err == ""


def test_dropped_interrupt_still_exits(capsys):
    """A block that ends normally after a stop signal, whose KeyboardInterrupt Python dropped
    in a finalizer, still exits with status 130."""
    stop_requested.set()
    try:
        with pytest.raises(SystemExit) as caught:
            with exit_quietly_when_stopped("interrupted while starting; nothing was run"):
                pass
    finally:
        stop_requested.clear()
    assert caught.value.code == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "error: interrupted while starting; nothing was run\n"


def first_line_of(tree: ast.Module, condition) -> int | None:
    """Return the line of the first node of `tree` for which `condition` holds, or None."""
    lines = [node.lineno for node in ast.walk(tree) if condition(node)]
    return min(lines) if lines else None


def is_slow_import(node: ast.AST) -> bool:
    """Tell whether `node` imports a module outside Python's standard library, other than
    saffu.signals."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
    else:
        return False
    return any(name.split(".")[0] not in sys.stdlib_module_names and name != "saffu.signals" for name in names)


@pytest.mark.parametrize("program", PROGRAMS)
def test_stop_handlers_installed_before_slow_imports(program):
    """Each program installs its stop handlers before it imports any third-party module,
    and runs those imports inside exit_quietly_when_stopped."""
    tree = ast.parse((REPO / program).read_text())
    handlers = first_line_of(
        tree, lambda node: isinstance(node, ast.Call) and getattr(node.func, "id", None) == "handle_stop_signals"
    )
    first_slow = first_line_of(tree, is_slow_import)
    assert handlers is not None and first_slow is not None
    assert handlers < first_slow
    guarded = [
        node for node in tree.body if isinstance(node, ast.With)
        and getattr(node.items[0].context_expr.func, "id", None) == "exit_quietly_when_stopped"
    ]
    assert guarded and first_slow >= guarded[0].lineno


def test_analysis_package_imports_nothing_slow():
    """`python -m analysis.archive` imports the package first, before the program can catch
    a signal; the package imports its modules only when a name is used."""
    code = (
        "import sys, analysis\n"
        "print(sorted({'pandas', 'mlflow', 'matplotlib', 'torch'} & set(sys.modules)))\n"
        "from analysis import load_runs, write_report\n"
        "print(load_runs.__module__, write_report.__module__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["[]", "analysis.load analysis.report"]
