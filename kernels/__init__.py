"""Kernel adapters and the project's own kernels. Installed as ``layerzero_serve.kernels``.

A leaf package: imports torch, triton and kernel libraries only, never the runtime.
"""
