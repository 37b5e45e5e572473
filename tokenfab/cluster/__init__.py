"""Many replicas behind one front end: the Router (an EngineClient over engine cores), its policies, the KV index
fed by the replicas' KV events, and the pool of local replica processes."""
