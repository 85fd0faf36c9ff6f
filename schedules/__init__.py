"""Our TIR kernels and their schedules, each with a numpy reference test in tests/."""

from qwen3c.schedules.cpu_matmul import schedule_cpu_matmuls, schedule_nt_matmul

__all__ = ["schedule_cpu_matmuls", "schedule_nt_matmul"]
