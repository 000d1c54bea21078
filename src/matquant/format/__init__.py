"""The checkpoint format: the folder and its config, every load-time check, atomic writes, dense export."""
