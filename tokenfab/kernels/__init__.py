"""Hot paths written for this stack: CPU linear kernels over compact weight formats (C++, built on first use)."""
