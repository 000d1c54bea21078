from matquant.mixnmatch.schedules import DEFAULT_LADDER, SCHEDULES, bits_map_for_schedule, schedule_bits

__all__ = ["DEFAULT_LADDER", "SCHEDULES", "bits_map_for_schedule", "schedule_bits"]
