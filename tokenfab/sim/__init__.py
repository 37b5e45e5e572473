"""The simulator: the real scheduler, KV cache manager and routing policies over virtual time, the model replaced by
a step-cost model fitted from measured steps (`tokenfab profile`, `tokenfab simulate`)."""
