"""What the runtime asks of the kernels package: the catalogue of kernel specs and the probe
of installed backends. Importing it imports no kernel library (each backend module imports
its library only when probed or built).

CUDA graphs: host only; read when plans are built, never per step.
"""

from __future__ import annotations

from layerzero_serve.kernels._backends import BackendStatus, probe_all, probe_backend
from layerzero_serve.kernels._catalog import all_specs

__all__ = ["BackendStatus", "all_specs", "probe_all", "probe_backend"]
