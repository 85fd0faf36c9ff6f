"""Our TIR kernels and their schedules, each with a numpy reference test in tests/."""

from qwen3c.schedules.cpu_gemm import dispatch_cpu_gemm, nt_gemm, vector_unit
from qwen3c.schedules.cpu_matmul import schedule_cpu_matmuls, schedule_nt_matmul

__all__ = ["dispatch_cpu_gemm", "nt_gemm", "schedule_cpu_matmuls", "schedule_nt_matmul",
           "vector_unit"]
