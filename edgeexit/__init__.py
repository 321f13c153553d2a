"""edgeexit: deploy early-exit neural networks across an edge device and a server.

The flow is one way: ``export`` (torch side) -> bundle -> runtime (device agent, cloud service). Importing
this package never imports torch; :func:`export` imports it when called.
"""

from __future__ import annotations

from typing import Any

from edgeexit.bundle import Bundle
from edgeexit.errors import EdgeExitError

__version__ = "0.1.0"
__all__ = ["Bundle", "EdgeExitError", "export", "__version__"]


def export(*args: Any, **kwargs: Any) -> Bundle:
    """Export a multi-exit model to a bundle; see :func:`edgeexit.exporters.export_model`."""
    from edgeexit.exporters import export_model

    return export_model(*args, **kwargs)
