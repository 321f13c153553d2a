"""Torch side of edgeexit: trace a multi-exit model once, cut it into segments, write a bundle.

Importing this package is light; torch is imported when :func:`export_model` runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeexit.exporters.options import ExportOptions

if TYPE_CHECKING:
    from pathlib import Path

    from edgeexit.bundle import Bundle

__all__ = ["ExportOptions", "export_model"]


def export_model(model_or_path: Any, out: str | Path, *, options: ExportOptions | None = None) -> Bundle:
    """Export a multi-exit model to ``out`` (a ``NAME.edgeexit`` directory); see ``edgeexit export --help``."""
    from edgeexit.exporters.export import export_model as _export

    return _export(model_or_path, out, options=options)
