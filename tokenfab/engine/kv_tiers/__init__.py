"""KV tiers behind the engine's block pool: host memory, then disk. A block evicted from the pool is written back
to the host tier (and from there, when the host tier is full, to disk); a prefix hit in a tier is loaded back into
the pool when that is predicted cheaper than recomputing it (`KVTiers`)."""

from tokenfab.engine.kv_tiers.disk import DiskTier
from tokenfab.engine.kv_tiers.host import HostTier
from tokenfab.engine.kv_tiers.store import Evicted, TierStore
from tokenfab.engine.kv_tiers.tiers import KVTiers, tier_namespace

__all__ = ["DiskTier", "Evicted", "HostTier", "KVTiers", "TierStore", "tier_namespace"]
