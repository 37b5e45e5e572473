"""KV transfer between replicas for prefill/decode disaggregation: a prefill leg's blocks are held after it finishes
(`ExportTable`) and served (`KVServer`); the decode replica pulls the ones it lacks by stable hash (`KVPuller`)
into its own pool, where they are ordinary prefix-cache hits. Transports: shared memory on one host, ZeroMQ/TCP
across hosts."""

from tokenfab.engine.kv_transfer.exports import Export, ExportTable
from tokenfab.engine.kv_transfer.transport import TRANSPORTS, KVPuller, KVServer, Remote, SharedSegments

__all__ = ["TRANSPORTS", "Export", "ExportTable", "KVPuller", "KVServer", "Remote", "SharedSegments"]
