"""Cambricon MLUs through BYOC: partitions run as CNNL operators on the CNRT runtime.

Generated and compile-checked only, against qwen3c's own declarations of the CNRT/CNNL calls
it makes (``vendor/cambricon_api.h``: no Cambricon headers are obtainable here); nothing was
linked against Neuware or run on MLU hardware. With NEUWARE_HOME set the partition library is
built against the real headers.
"""

from __future__ import annotations

from pathlib import Path

from qwen3c.targets.byoc_target import ByocTarget


class MluTarget(ByocTarget):
    name = "mlu"
    backend = "mlu"
    description = ("Cambricon MLU via BYOC: matmul, RMSNorm, SwiGLU, MoE routing and experts "
                   "as CNNL operators; the rest of the graph on the host CPU")
    verified = ("partitioning tested, generated C++ compiled against qwen3c's declarations of "
                "CNRT/CNNL (no vendor headers available), host graph run on CPU with qwen3c's "
                "reference partitions and checked against HF; never run on an MLU")
    sdk = "Cambricon Neuware (CNRT + CNNL)"
    sdk_env = "NEUWARE_HOME"
    device_header = "mlu_device.h"
    device_class = "MluDevice"
    headers = ("mlu_device.h", "cambricon_api.h")

    def sdk_flags(self, root: Path) -> list[str]:
        return ["-DQWEN3C_NEUWARE", f"-I{root / 'include'}", f"-L{root / 'lib64'}", "-lcnrt",
                "-lcnnl"]
