"""Our TIR kernels and their schedules, each with a numpy reference test in tests/.

Kernel factories that the model calls once per layer are cached (``functools.cache``): parsing
a TVMScript kernel costs up to a quarter of a second, and the 0.6B q4 model asked for 226.
Importing the package also makes TVMScript's macros find their parser faster
(``tvmscript_macros``).
"""

from qwen3c.schedules import tvmscript_macros
from qwen3c.schedules.cpu_gemm import dispatch_cpu_gemm, nt_gemm, vector_unit
from qwen3c.schedules.cpu_matmul import schedule_cpu_matmuls, schedule_nt_matmul

tvmscript_macros.install()

__all__ = ["dispatch_cpu_gemm", "nt_gemm", "schedule_cpu_matmuls", "schedule_nt_matmul",
           "vector_unit"]
