"""Errors that reach the user: each names where the problem is and which rule it breaks."""
from __future__ import annotations


class CmrError(Exception):
    """Base class; the CLI turns it into a one-line message and exit code 2."""


class ConfigError(CmrError):
    """``params.yaml`` (or an override) breaks the typed schema."""


class UnknownNameError(ConfigError, KeyError):
    """A name no registry holds (a setting's value); also a KeyError, as a lookup by name."""

    __str__ = Exception.__str__  # KeyError would quote the message


class DataError(CmrError):
    """Input data breaks a rule. ``where`` names the file and row/field."""

    def __init__(self, where: str, rule: str, detail: str = ""):
        self.where, self.rule, self.detail = where, rule, detail
        msg = f"{where}: breaks rule '{rule}'"
        super().__init__(msg + (f": {detail}" if detail else ""))
