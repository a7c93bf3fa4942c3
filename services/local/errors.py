"""How the launcher reports: `LauncherError` for start-up problems the user can fix (carrying the
exit status `serve` returns), and the `Log` callback its steps print progress through."""

from __future__ import annotations

from collections.abc import Callable

Log = Callable[[str], None]


class LauncherError(Exception):
    """A start-up problem the user can fix; `exit_code` is what `main` returns."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def print_progress(message: str) -> None:
    """The default `Log`: one line on stdout, flushed (the launcher runs in a terminal)."""
    print(message, flush=True)
