"""Recommend a format: a pure policy over result records (:mod:`.policy`), and deployment
scenarios that set its budget (:mod:`.scenarios`). Nothing here loads or measures a model."""

from .policy import (DEFAULT_LADDER, PREFERENCES, Decision, Ladder, Step, Target, TrailStep, check_quality,
                     recipe_ladder, recommend)
from .scenarios import SCENARIOS, Scenario, scenario_target

__all__ = ["DEFAULT_LADDER", "PREFERENCES", "Decision", "Ladder", "Step", "Target", "TrailStep", "check_quality",
           "recipe_ladder", "recommend", "SCENARIOS", "Scenario", "scenario_target"]
