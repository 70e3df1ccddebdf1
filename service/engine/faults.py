"""A test seam for the engine's failure handling, passed in at construction (`Engine(..., faults=Faults())`).

The engine calls `before_step(plan)` before each model step (the scheduler's Plan: which prompt chunks and
decode rows the step holds) and `before_sample(request)` before it samples a row; either may raise. The tests
arm them to inject a failing step, an out-of-memory step, a dead worker or a row whose sampling breaks, and
check that the engine fails exactly what it should and goes on. In production no Faults object is given and
the calls do nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.engine.request import GenerationRequest

if TYPE_CHECKING:
    from service.engine.scheduler import Plan


@dataclass
class Faults:
    step: Callable[[Plan], None] | None = None  # raise to fail the step (or, a BaseException, the worker)
    sample: Callable[[GenerationRequest], None] | None = None  # raise to fail sampling one row

    def before_step(self, plan: Plan) -> None:
        if self.step is not None:
            self.step(plan)

    def before_sample(self, request: GenerationRequest) -> None:
        if self.sample is not None:
            self.sample(request)
