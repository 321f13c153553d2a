"""`Closing`: the testbed's context managers (a testbed, a scenario, a namespace link) start several things;
if starting fails part-way, what did start is stopped before the error goes on, so nothing outlives a test."""

from __future__ import annotations

from typing import Self


class Closing:
    """``with X(...) as x``: runs ``open()``; on failure ``close()`` then re-raise; ``close()`` on exit.

    ``close`` must stop whatever ``open`` got to start (and nothing else), and be safe to call twice."""

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
