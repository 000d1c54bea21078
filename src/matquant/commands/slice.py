"""matquant slice: the old spelling of `matquant export --format hf` (same flags, same output)."""
from matquant.commands.export import register_slice_alias

register = register_slice_alias
