"""The meter's client side: workloads, load generation, metric math, sweeps and reports for any OpenAI server."""
