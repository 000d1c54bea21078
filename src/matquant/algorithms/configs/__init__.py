"""One config dataclass per quantization method (its options, defaults, help, calibration defaults, validate(),
run()); `make_config(method, **options)` builds one by name."""
from matquant.algorithms.configs.base import (METHOD_CONFIGS, MethodConfig, config_class, make_config, option,
                                              register_config)
from matquant.algorithms.configs.gptq import GPTQConfig
from matquant.algorithms.configs.matgptq import MatGPTQConfig
from matquant.algorithms.configs.omniquant import OmniQuantConfig
from matquant.algorithms.configs.qat import QATConfig
from matquant.algorithms.configs.rtn import RTNConfig

__all__ = ["METHOD_CONFIGS", "MethodConfig", "RTNConfig", "GPTQConfig", "MatGPTQConfig", "OmniQuantConfig",
           "QATConfig", "config_class", "make_config", "option", "register_config"]
