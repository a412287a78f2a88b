"""The project's own Triton kernels: paged KV write, split-KV paged decode and causal paged
prefill/extend over the ``[num_blocks, 2, block_size, Hkv, D]`` cache.

Importing this package does not import triton (the selection catalog imports
``layerzero_serve.kernels._triton.backend`` on machines without it). The kernel modules
(``kv_write``, ``paged_decode``, ``paged_prefill``) import triton; import them only where it is
installed. To run them on a CPU under Triton's interpreter, set ``TRITON_INTERPRET=1`` before
they are first imported (``triton.jit`` reads it when a kernel is decorated).
"""
