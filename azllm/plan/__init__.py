"""Fitting training into a memory budget: planner (arithmetic), profiler (a real step), CLI."""

from azllm.memory import estimate_peak
from azllm.plan.cli import register
from azllm.plan.planner import HEADROOM, Plan, make_plan, parse_vram, plan_table
from azllm.plan.profiler import measure_peak

__all__ = [
    "HEADROOM",
    "Plan",
    "estimate_peak",
    "make_plan",
    "measure_peak",
    "parse_vram",
    "plan_table",
    "register",
]
