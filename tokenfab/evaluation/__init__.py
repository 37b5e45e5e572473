"""Accuracy of weight formats: perplexity, KL divergence and greedy agreement against a reference model."""
