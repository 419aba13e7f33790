"""Errors the service answers with a status code of their own: request errors
(:class:`CandidateError` and its subclasses, a 4xx) and :class:`ServiceUnavailable` (503)."""

from __future__ import annotations

#: The most characters of a client's input an error message quotes.
QUOTE_LIMIT = 200


def quote_input(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of a client-supplied value, cut to ``limit`` characters (a 1 MB id is not echoed)."""
    text = str(value)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


class CandidateError(Exception):
    """Base class of request errors; ``status_code`` is the HTTP status the service answers. A 422
    has FastAPI's body shape; ``loc`` (when set) is its ``loc``, else the service picks one."""

    status_code = 422
    loc: list[str | int] | None = None

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class ServiceUnavailable(Exception):
    """No model (or no ranker) is loaded: 503."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
