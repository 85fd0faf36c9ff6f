"""Huawei Ascend NPUs through BYOC: partitions run as aclnn operators on the ACL runtime.

Generated and compile-checked only: the sources compile against the real ACL headers of the
torch-npu wheel (aclnn declared by qwen3c, ``vendor/aclnn_api.h``); nothing was linked against
CANN or run on Ascend hardware. With ASCEND_TOOLKIT_HOME set the partition library is built.
"""

from __future__ import annotations

from pathlib import Path

from qwen3c.targets.byoc_target import ByocTarget


class AscendTarget(ByocTarget):
    name = "ascend"
    backend = "ascend"
    description = ("Huawei Ascend via BYOC: matmul, RMSNorm, SwiGLU, MoE routing and experts "
                   "as aclnn operators; the rest of the graph on the host CPU")
    verified = ("partitioning tested, generated C++ compiled against the real ACL headers "
                "(torch-npu wheel), host graph run on CPU with qwen3c's reference partitions "
                "and checked against HF; never linked against CANN, never run on Ascend")
    sdk = "Ascend CANN (ACL + aclnn)"
    sdk_env = "ASCEND_TOOLKIT_HOME"
    device_header = "ascend_device.h"
    device_class = "AscendDevice"
    headers = ("ascend_device.h", "aclnn_api.h")

    def sdk_flags(self, root: Path) -> list[str]:
        return [f"-I{root / 'include'}", f"-L{root / 'lib64'}", "-lascendcl", "-lnnopbase",
                "-lopapi"]
