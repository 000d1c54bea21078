from matquant.models.loading import DEFAULT_MODEL, load_model, resolve_model
from matquant.models.targets import SCOPES, find_targets, layer_index, linear_weight

__all__ = ["DEFAULT_MODEL", "load_model", "resolve_model", "SCOPES", "find_targets", "layer_index", "linear_weight"]
