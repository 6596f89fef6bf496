"""ilql: offline RL fine-tuning of causal language models by Implicit Language Q-Learning."""

from .config import (
    ILQLConfig,
    ModelConfig,
    OptimizerConfig,
    SchedulerConfig,
    TokenizerConfig,
    TrainConfig,
    TRLConfig,
    default_ilql_config,
)
from .data import EpisodeStore, ILQLBatch, TokenRewards, make_episodes
from .errors import ConfigError, DataError, DataTypeError, ILQLError, TrainingError
from .generation import GenerationOutput
from .heads import ILQLHeads
from .loss import ilql_loss
from .logits_process import ILQLLogitsProcessor, hf_generate
from .modeling import AutoModelForCausalLMWithILQLHeads
from .preferences import preferences
from .sources import load_file
from .trainer import ILQLTrainer, train

__version__ = "0.1.0"

__all__ = [
    "AutoModelForCausalLMWithILQLHeads",
    "ConfigError",
    "DataError",
    "DataTypeError",
    "EpisodeStore",
    "GenerationOutput",
    "ILQLBatch",
    "ILQLConfig",
    "ILQLError",
    "ILQLHeads",
    "ILQLLogitsProcessor",
    "ILQLTrainer",
    "ModelConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "TokenizerConfig",
    "TrainConfig",
    "TrainingError",
    "TokenRewards",
    "TRLConfig",
    "default_ilql_config",
    "hf_generate",
    "ilql_loss",
    "load_file",
    "make_episodes",
    "preferences",
    "train",
]
