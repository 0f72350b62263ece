"""Pipeline parallelism: schedules as data, lowered, simulated, then run.

    from parallel.pipeline import Pipeline, build, lower, simulate
    print(simulate(build("1f1b", nranks=4, nmicro=8)).grid())

Files: schedule.py (actions, generators, text form), lowering.py (sends and
receives), simulate.py (verifier, dry run), stage.py (cutting the model),
runtime.py (one rank's executor), pipe.py (``Pipeline``).
"""

from .lowering import lower
from .pipe import Pipeline
from .runtime import Spec, StepStats
from .schedule import (SCHEDULES, Action, Kind, PipelineSchedule, ScheduleError, build, format_schedule, gpipe,
                       interleaved, one_f_one_b, parse_schedule)
from .simulate import Simulation, ideal_bubble, peak_activations, simulate, verify
from .stage import StageModule, partition

__all__ = ["SCHEDULES", "Action", "Kind", "Pipeline", "PipelineSchedule", "ScheduleError", "Simulation", "Spec",
           "StageModule", "StepStats", "build", "format_schedule", "gpipe", "ideal_bubble", "interleaved", "lower",
           "one_f_one_b", "parse_schedule", "partition", "peak_activations", "simulate", "verify"]
