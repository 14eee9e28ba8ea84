"""What is wrong with the data, and where: the one record of a problem that every reader, layout and
check shares."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Issue:
    """One problem found in the data: where (``file:line``), which field, what is wrong and how to fix it."""

    location: str
    """``path:line`` of the record (see the module docstring for what the number means), a path for
    problems of a whole file, or a split/role name for problems of a whole set."""
    field: str
    """The field concerned: as named in the input file for reading problems, the canonical name
    (``prompt``, ``chosen``, ``rejected``) for checks of prepared rows, ``record`` for a whole record,
    ``""`` for a whole file or set."""
    message: str
    """What is wrong, then how to fix it in parentheses."""
    kind: str = ""
    """A short name of the problem (``malformed_json``, ``missing_field``, ``tie``...) for counting."""

    def __str__(self) -> str:
        return f"{self.location}: {self.field}: {self.message}" if self.field else f"{self.location}: {self.message}"


class DataError(Exception):
    """A whole source cannot be used; the message reads ``file[:line]: what is wrong (how to fix)``."""

    def __init__(self, message: str, location: str = "", kind: str = "file"):
        super().__init__(f"{location}: {message}" if location else message)
        self.issue = Issue(location, "", message, kind)


