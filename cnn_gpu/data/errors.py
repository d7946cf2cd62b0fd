"""The error of a user's data: one line naming the file or folder, what was expected and what was found."""

from __future__ import annotations


class DataError(ValueError):
    """A user's images or arrays cannot be used as they are (a corrupt image, an empty class folder,
    labels out of range, ...); the message is one line and names the file or folder."""


__all__ = ["DataError"]
