"""CRAM and its baselines, built from one layer type (`CRAMLayer`) and named configurations."""
from .config import (ABLATIONS, MODEL_NAMES, TABLE1_MODELS, LayerSpec, ModelConfig,
                     model_config)
from .cram import CRAMLayer, CRAMModel, LayerRecord, ModelOutput

__all__ = ["ABLATIONS", "MODEL_NAMES", "TABLE1_MODELS", "LayerSpec", "ModelConfig",
           "model_config", "CRAMLayer", "CRAMModel", "LayerRecord", "ModelOutput"]
