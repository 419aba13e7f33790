"""Errors the service answers with a status code of its own (besides request errors,
:class:`~kgrec.serving.candidates.CandidateError`)."""

from __future__ import annotations


class ServiceUnavailable(Exception):
    """No model (or no ranker) is loaded: 503."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
