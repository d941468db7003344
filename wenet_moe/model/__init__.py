"""Model package: `build_model(configs) -> ASRModel` and its parts."""
from wenet_moe.model.asr_model import ASRModel
from wenet_moe.model.builder import REGISTRY, build_model, count_parameters

__all__ = ["ASRModel", "REGISTRY", "build_model", "count_parameters"]
