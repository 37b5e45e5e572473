"""Speculative decoding: proposers (n-gram lookup, draft model, MTP modules), lossless verification, adaptive policy."""
