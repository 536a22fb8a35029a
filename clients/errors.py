"""Which exceptions are the user's to fix (printed as one line) and which are bugs (traceback)."""

from __future__ import annotations

_PROJECT_PACKAGES = ("editing.", "dictionaries.", "service.", "clients.")


def is_user_error(err: BaseException) -> bool:
    """True for the project's own error types (``ModelLoadError``, ``CorpusError``, ...)."""
    return any(
        cls.__module__.startswith(_PROJECT_PACKAGES) and issubclass(cls, (ValueError, LookupError, OSError))
        for cls in type(err).__mro__
    )
