"""embxfer: move multimodal embeddings from encoder engines to language engines.

The public face; the work lives in `embxfer.kernels` (data plane), `embxfer.control`
(control plane) and `embxfer.runtime` (engine layer). Names are resolved lazily, so
`import embxfer.control` in a process that only needs the ring does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "connect": "embxfer.runtime.api",
    "Config": "embxfer.runtime",
    "Payload": "embxfer.runtime",
    "RequestState": "embxfer.runtime.state",
    "Sender": "embxfer.runtime.sender",
    "Receiver": "embxfer.runtime.receiver",
    "Topology": "embxfer.runtime.topology",
    "LocalCluster": "embxfer.runtime.local",
    "Metrics": "embxfer.runtime.metrics",
    "BlockAllocator": "embxfer.runtime",
    "BlockPool": "embxfer.runtime",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'embxfer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
