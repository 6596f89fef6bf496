"""`AutoModelForCausalLMWithILQLHeads`: any transformers causal LM plus ILQL heads.

On disk a model directory is a plain transformers checkpoint (config + safetensors weights)
with two more files, ``ilql_heads.safetensors`` and ``ilql_config.json``. Plain
``transformers.AutoModelForCausalLM.from_pretrained(dir)`` opens it without any
missing/unused-weight warning because the heads live in their own file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from .errors import ConfigError
from .heads import ILQLHeads
from .loss import VocabHeadInputs

HEADS_FILE = "ilql_heads.safetensors"
HEADS_CONFIG_FILE = "ilql_config.json"


@dataclass
class ILQLOutput:
    logits: torch.Tensor  # LM logits at the action states [B, A, V] (all positions without indices)
    qs: List[torch.Tensor]  # each [B, A, V]
    target_qs: List[torch.Tensor]  # each [B, A] at the taken actions, or [B, A, V] without actions
    vs: torch.Tensor  # [B, S]
    past_key_values: Optional[object] = None


def _gather_positions(hs: torch.Tensor, ixs: torch.Tensor) -> torch.Tensor:
    return hs.gather(1, ixs.unsqueeze(-1).expand(-1, -1, hs.shape[-1]))


class AutoModelForCausalLMWithILQLHeads(nn.Module):
    """A causal LM (``base_model``) with ILQL heads (``ilql_heads``) on its last hidden state."""

    def __init__(self, base_model: PreTrainedModel, two_qs: bool = True, alpha: float = 0.99):
        super().__init__()
        self.base_model = base_model
        config = base_model.config
        hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
        vocab = base_model.get_output_embeddings().weight.shape[0]
        self.ilql_heads = ILQLHeads(hidden, vocab, two_qs=two_qs, alpha=alpha)
        self.ilql_heads.to(device=base_model.device, dtype=next(base_model.parameters()).dtype)

    # ----------------------------------------------------------------- construction and I/O
    @property
    def config(self) -> PretrainedConfig:
        return self.base_model.config

    @property
    def two_qs(self) -> bool:
        return self.ilql_heads.two_qs

    @property
    def device(self) -> torch.device:
        return self.base_model.device

    @classmethod
    def from_config(cls, config: PretrainedConfig, two_qs: bool = True, alpha: float = 0.99, **kwargs):
        """A randomly initialised LM from a transformers config (training from scratch)."""
        return cls(AutoModelForCausalLM.from_config(config, **kwargs), two_qs=two_qs, alpha=alpha)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: Union[str, os.PathLike],
        two_qs: Optional[bool] = None,
        alpha: Optional[float] = None,
        **kwargs,
    ):
        """Load the LM with transformers and, when the directory has them, the ILQL heads.

        A plain LM checkpoint gets freshly initialised heads. `kwargs` go to
        ``AutoModelForCausalLM.from_pretrained`` (``trust_remote_code`` stays off unless given)."""
        path = Path(pretrained_model_name_or_path)
        saved = {}
        if (path / HEADS_CONFIG_FILE).is_file():
            saved = json.loads((path / HEADS_CONFIG_FILE).read_text(encoding="utf-8"))
        if two_qs is not None and "two_qs" in saved and saved["two_qs"] != two_qs:
            raise ConfigError(
                f"{path} holds heads trained with two_qs={saved['two_qs']}, but two_qs={two_qs} was asked for"
            )
        kwargs.setdefault("trust_remote_code", False)
        base = AutoModelForCausalLM.from_pretrained(str(pretrained_model_name_or_path), **kwargs)
        model = cls(
            base,
            two_qs=saved.get("two_qs", True) if two_qs is None else two_qs,
            alpha=saved.get("alpha", 0.99) if alpha is None else alpha,
        )
        if (path / HEADS_FILE).is_file():
            state = load_file(str(path / HEADS_FILE), device=str(model.device))
            model.ilql_heads.load_state_dict(state, strict=True)
            model.ilql_heads.to(dtype=next(base.parameters()).dtype)
        return model

    def save_pretrained(self, save_directory: Union[str, os.PathLike], **kwargs) -> None:
        """Write the LM (safetensors) and the heads. Everything is written to a temporary
        directory first and then moved into place file by file, so an interrupted save never
        leaves a truncated file behind."""
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            self.write_files(tmp, **kwargs)
            publish_directory(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def write_files(self, directory: Union[str, os.PathLike], state_dict=None, **kwargs) -> None:
        """Write the model's files into an existing directory (no atomicity of its own).

        `state_dict`: full weights to write instead of the live ones (keys as in this model's
        state dict), e.g. gathered on rank 0 from FSDP or tensor-parallel shards."""
        directory = Path(directory)
        heads = self.ilql_heads.state_dict()
        if state_dict is not None:
            kwargs["state_dict"] = {k[len("base_model."):]: v for k, v in state_dict.items() if k.startswith("base_model.")}
            heads = {k[len("ilql_heads."):]: v for k, v in state_dict.items() if k.startswith("ilql_heads.")}
        with _quiet_progress_bars():  # a checkpoint every N steps should not print a bar each time
            self.base_model.save_pretrained(str(directory), **kwargs)
        state = {k: v.detach().contiguous().cpu() for k, v in heads.items()}
        save_file(state, str(directory / HEADS_FILE), metadata={"format": "pt"})
        heads_config = dict(
            two_qs=self.ilql_heads.two_qs,
            alpha=self.ilql_heads.alpha,
            hidden_size=self.ilql_heads.hidden_size,
            vocab_size=self.ilql_heads.vocab_size,
        )
        (directory / HEADS_CONFIG_FILE).write_text(json.dumps(heads_config, indent=2), encoding="utf-8")

    def freeze_bottom_layers(self, num_layers_unfrozen: int) -> None:
        """Train only the last `num_layers_unfrozen` blocks (and the heads); -1 trains all.

        The input embeddings freeze with the bottom blocks (and so does a tied LM head)."""
        if num_layers_unfrozen < 0:
            return
        blocks = _transformer_blocks(self.base_model)
        self.base_model.get_input_embeddings().requires_grad_(False)
        for block in blocks[: max(0, len(blocks) - num_layers_unfrozen)]:
            block.requires_grad_(False)

    def sync_target_q_heads(self) -> None:
        self.ilql_heads.sync_target_q_heads()

    # ----------------------------------------------------------------------------- forward
    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        """Last hidden state of the trunk (after its final norm) and the KV cache."""
        trunk = self.base_model.base_model
        if not use_cache and past_key_values is None:
            trunk = self.__dict__.get("_compiled_trunk", trunk)  # training: fixed-shape calls only
        out = trunk(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        return out.last_hidden_state, (out.past_key_values if use_cache else None)

    def compile_trunk(self, **compile_kwargs) -> None:
        """Use ``torch.compile`` on the trunk for training forwards (not for cached decoding,
        whose shapes change every token). Kept out of the module tree, so state dicts and
        checkpoints stay those of the plain model."""
        if "_compiled_trunk" not in self.__dict__:
            self.__dict__["_compiled_trunk"] = torch.compile(self.base_model.base_model, **compile_kwargs)

    @property
    def supports_chunked_loss(self) -> bool:
        """The chunked loss needs the LM head to be a plain linear layer."""
        return isinstance(self.base_model.get_output_embeddings(), nn.Linear)

    def lm_logits(self, hs: torch.Tensor) -> torch.Tensor:
        logits = self.base_model.get_output_embeddings()(hs)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values=None,
        actions_ixs: Optional[torch.Tensor] = None,
        states_ixs: Optional[torch.Tensor] = None,
        actions: Optional[torch.Tensor] = None,
        use_cache: bool = False,
    ) -> ILQLOutput:
        """With `actions_ixs`/`states_ixs` (training), heads run only where the losses need
        them; with `actions` too, the target Q heads give only the taken actions' values."""
        hs, cache = self.hidden_states(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        actions_hs = hs if actions_ixs is None else _gather_positions(hs, actions_ixs)
        states_hs = hs if states_ixs is None else _gather_positions(hs, states_ixs)
        qs, target_qs, vs = self.ilql_heads(states_hs, actions_hs, actions)
        return ILQLOutput(self.lm_logits(actions_hs), qs, target_qs, vs, cache)

    def loss_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        actions_ixs: torch.Tensor,
        states_ixs: torch.Tensor,
        actions: torch.Tensor,
        position_ids: Optional[torch.Tensor] = None,
    ) -> VocabHeadInputs:
        """The training forward for `ilql_loss_chunked`: like `forward` with indices, but it
        stops before every vocabulary-sized layer and returns their inputs and weights."""
        if not self.supports_chunked_loss:
            raise ConfigError(
                f"method.chunk_size needs a linear LM head; {type(self.base_model).__name__} has "
                f"{type(self.base_model.get_output_embeddings()).__name__}: set method.chunk_size to null"
            )
        hs, _ = self.hidden_states(input_ids, attention_mask, position_ids)
        actions_hs = _gather_positions(hs, actions_ixs)
        states_hs = _gather_positions(hs, states_ixs)
        q_bodies, target_qs, vs = self.ilql_heads.loss_features(states_hs, actions_hs, actions)
        lm_head = self.base_model.get_output_embeddings()
        return VocabHeadInputs(
            lm_hs=actions_hs,
            lm_weight=lm_head.weight,
            lm_bias=lm_head.bias,
            q_hs=[h for h, _ in q_bodies],
            q_weights=[last.weight for _, last in q_bodies],
            q_biases=[last.bias for _, last in q_bodies],
            target_qs=target_qs,
            vs=vs,
            lm_softcap=getattr(self.config, "final_logit_softcapping", None) or None,
        )

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Advantage-guided decoding; see `ilql.generation.generate` for the arguments."""
        from .generation import generate

        return generate(self, input_ids, **kwargs)


@contextlib.contextmanager
def _quiet_progress_bars():
    """Silence transformers' progress bars for the duration, restoring the user's setting."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _transformer_blocks(model: PreTrainedModel) -> nn.ModuleList:
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for module in model.base_model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ConfigError(f"cannot find the {n_layers} transformer blocks of {type(model).__name__} to freeze")


def publish_directory(source: Path, target: Path) -> None:
    """Move every file of `source` into `target` with atomic renames (one file at a time)."""
    if not target.exists():
        os.replace(source, target)
        return
    for path in sorted(source.rglob("*")):
        dest = target / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        else:
            os.replace(path, dest)
