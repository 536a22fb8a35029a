"""Which exceptions are the user's to fix (printed as one line) and which are bugs (traceback)."""

from __future__ import annotations

_PROJECT_PACKAGES = ("editing.", "dictionaries.", "service.", "clients.")


def is_user_error(err: BaseException) -> bool:
    """True for the project's own error types (``ModelLoadError``, ``CorpusError``, a server's
    4xx answer, ...) and for a server that cannot be reached."""
    if type(err).__name__ == "SteerserveError":
        return 400 <= getattr(err, "status", 0) < 500
    if type(err).__module__.startswith("requests") and type(err).__name__ in ("ConnectionError", "Timeout"):
        return True
    return any(
        cls.__module__.startswith(_PROJECT_PACKAGES) and issubclass(cls, (ValueError, LookupError, OSError))
        for cls in type(err).__mro__
    )
