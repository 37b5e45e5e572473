"""Offline quantization tools: write quantized checkpoints (`tokenfab quantize`).

The runtime weight formats they produce live in tokenfab.quant; these tools sit above the models they read.
"""
