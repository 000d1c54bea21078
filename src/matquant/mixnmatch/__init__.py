from matquant.mixnmatch.budget import Budget, CostModel, parse_budget, validate_bits_map
from matquant.mixnmatch.schedules import (DEFAULT_LADDER, FLOORS, GRANULARITIES, SCHEDULES, bits_map_for_schedule,
                                          group_units, resolve_floor, schedule_bits, schedule_map)

__all__ = ["DEFAULT_LADDER", "FLOORS", "GRANULARITIES", "SCHEDULES", "bits_map_for_schedule", "group_units",
           "resolve_floor", "schedule_bits", "schedule_map", "Budget", "CostModel", "parse_budget", "validate_bits_map"]
