"""embxfer: move multimodal embeddings from encoder engines to language engines.

The public face; the work lives in `embxfer.kernels` (data plane), `embxfer.control`
(control plane) and `embxfer.runtime` (engine layer).
"""

from embxfer.runtime import BlockAllocator, BlockPool, Config, Payload

__version__ = "0.1.0"

__all__ = ["BlockAllocator", "BlockPool", "Config", "Payload", "__version__"]
