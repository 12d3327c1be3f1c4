"""GPU schedules of the fused op: the rope and norm branches and the block-group layout.

Installed as ``tvm_fused.schedules`` (pyproject maps this folder into the package).
"""

from .config import ScheduleConfig, default_schedule_config
from .fused import schedule_fused_rope_rmsnorm

__all__ = ["ScheduleConfig", "default_schedule_config", "schedule_fused_rope_rmsnorm"]
