"""The schedules of the op (installed as ``tvm_fused.schedules``: pyproject maps this folder into
the package): the GPU block-group schedule of the rope, norm and count branches
(``fused.py``, ``rope.py``, ``norm.py``, ``count.py``), its knobs (``config.py``) and design
space (``space.py``), the CPU schedule (``cpu.py``), and the definition scheduled for a target
(``module.py``). They use the compiler's definition and marks; the compiler never imports
them.
"""

from .config import ScheduleConfig, default_schedule_config
from .module import default_config, scheduled_module

__all__ = ["ScheduleConfig", "default_config", "default_schedule_config", "scheduled_module"]
