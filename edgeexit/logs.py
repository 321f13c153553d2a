"""One logging path for every edgeexit command: stdlib logging, configured once by the process that runs.

- The agent and the service write one JSON object per line on stderr (journald and log shippers keep a line
  whole). Every line has ``ts``, ``level`` and ``event``: a named event (``start``, ``ready``, ``fallback``,
  ``circuit``, ``stop`` ...) followed by its fields, or ``log`` with ``logger`` and ``msg`` for a plain record
  (e.g. ``log.warning`` in the device runtime).
- Other commands write text lines ``[export   2.1s] message`` on stderr; stdout stays for results.
- Third-party records below ERROR (torch, onnxscript, litert internals ...) and Python warnings are hidden
  unless ``verbose``; `edgeexit export` also hides what native converters print (see `native_output_hidden`).
- Progress bars only on a terminal; in a log file a phase is one line when it ends (`ProgressBar`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any, TextIO

OWN = "edgeexit"  # our loggers' prefix: what `verbose=False` keeps below ERROR


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``{"ts", "level", "event", ...}`` (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower()}
        name = getattr(record, "event", None)
        if name:
            line["event"] = name
            for k, v in getattr(record, "fields", {}).items():
                line.setdefault(k, v)  # a field never overwrites ts/level/event
        else:
            line.update(event="log", logger=record.name, msg=record.getMessage())
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """``[prog  12.3s] message`` (seconds since start); ``WARNING:`` and above say their level."""

    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        name = getattr(record, "event", None)
        if name:
            msg = " ".join([name, *(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())])
        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        text = f"[{self.prog} {record.relativeCreated / 1000:6.1f}s] {level}{msg}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes (test runners swap it), unless given a stream."""

    def __init__(self, stream: TextIO | None = None):
        super().__init__(stream)
        self._fixed = stream

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return self._fixed or sys.stderr

    @stream.setter
    def stream(self, value: TextIO | None) -> None:
        self._fixed = value


class _OwnOrSevere(logging.Filter):
    """Keeps edgeexit's records, and other libraries' only from ERROR up."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or record.name == OWN or record.name.startswith(OWN + ".")


def configure(json: bool = False, level: int = logging.INFO, verbose: bool = False, *, prog: str = "edgeexit",
              stream: TextIO | None = None) -> logging.Handler:
    """Route every record through one handler on the root logger (replacing one an earlier call installed).

    ``json``: JSON lines (agent, service) instead of text; ``level``: the lowest level shown (INFO: nothing of
    ours is dropped); ``verbose``: also third-party records below ERROR and Python warnings."""
    root = logging.getLogger()
    for h in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(h)
    handler = _Stderr(stream)
    handler.setFormatter(JsonFormatter() if json else TextFormatter(prog))
    if not verbose:
        handler.addFilter(_OwnOrSevere())
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)  # warnings become "py.warnings" records: shown only when verbose
    return handler


def event(logger: logging.Logger, name: str, **fields: Any) -> None:
    """Log a named event (INFO) with fields: one JSON line ``{"ts", "level", "event": name, **fields}``."""
    logger.info(name, extra={"event": name, "fields": fields})


@contextlib.contextmanager
def native_output_hidden(hide: bool = True) -> Iterator[None]:
    """Hide what native code and libraries print straight to stderr (converter op counts, delegate banners,
    torch's own log handler, FutureWarnings) while the block runs; the handlers `configure` installed keep
    writing to the real stderr. If the block fails with anything but an edgeexit error, the hidden text is
    printed after all, since it may explain the failure."""
    from edgeexit.errors import EdgeExitError

    if not hide:
        yield
        return
    ours = [h for h in logging.getLogger().handlers if isinstance(h, _Stderr)]
    sys.stderr.flush()
    saved_fd = os.dup(2)
    real = os.fdopen(saved_fd, "w", buffering=1)
    before = [h._fixed for h in ours]
    for h in ours:
        h.setStream(real)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        failed = False
        try:
            yield
        except EdgeExitError:
            raise
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved_fd, 2)
            for h, old in zip(ours, before, strict=True):
                h.flush()
                h.stream = old
            if failed:
                sink.seek(0)
                sys.stderr.write(sink.read()[-20000:].decode(errors="replace"))
            real.close()


class ProgressBar:
    """A tqdm bar on a terminal; elsewhere (a log file, a pipe) one INFO line when the phase ends.

    ``update(n)`` is the progress callback (a no-op when disabled)."""

    def __init__(self, total: int, enabled: bool, desc: str, unit: str = "img"):
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = enabled
        self.done = 0
        self._t0 = time.perf_counter()
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def set_postfix_str(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def write(self, line: str) -> None:
        """A line above the bar (or a log line without one)."""
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            logging.getLogger("edgeexit.progress").info("%s", line)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            logging.getLogger("edgeexit.progress").info(
                "%s: %d/%d %s in %.1f s", self.desc, self.done, self.total, self.unit, time.perf_counter() - self._t0)
        self.enabled = False  # closed: a second close says nothing

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
