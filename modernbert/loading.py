"""from_pretrained / save_pretrained for local folders: config.json + safetensors, HF key names."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModernBertConfig

BASE_PREFIX = "model."


def read_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    from safetensors.torch import load_file

    def load(path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error type for bad headers
            raise ValueError(f"cannot read {path} (corrupt or truncated?): {err}") from err

    directory = Path(directory)
    single = directory / "model.safetensors"
    if single.exists():
        return load(single)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(load(directory / shard))
        return state
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")


def _align_prefix(state: dict, expected: set) -> dict:
    """Serve a head model from an encoder-only checkpoint and the reverse, as transformers does."""
    model_has_base_prefix = any(k.startswith(BASE_PREFIX) for k in expected)
    checkpoint_has_base_prefix = any(k.startswith(BASE_PREFIX) for k in state)
    if model_has_base_prefix and not checkpoint_has_base_prefix:
        return {BASE_PREFIX + k: v for k, v in state.items()}
    if checkpoint_has_base_prefix and not model_has_base_prefix:
        return {k[len(BASE_PREFIX):]: v for k, v in state.items() if k.startswith(BASE_PREFIX)}
    return state


class PretrainedMixin:
    """Adds from_pretrained / save_pretrained to a module built from a ModernBertConfig."""

    # Parameters that share storage with another one: {name: the name it is tied to}.
    tied_weights: dict[str, str] = {}

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: torch.dtype | None = None, strict: bool = True):
        """Build from ``directory``/config.json and load its safetensors weights.

        With ``strict``, a weight the model needs but the checkpoint lacks is an error, except the
        task head's when loading an encoder-only checkpoint into a head model (as transformers,
        these stay randomly initialized) and tied weights.
        """
        config = ModernBertConfig.from_pretrained(directory)
        model = cls(config)
        expected = set(model.state_dict())
        state = _align_prefix(read_state_dict(directory), expected)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k not in cls.tied_weights]
        loaded_encoder_only = not any(k in state for k in expected if not k.startswith(BASE_PREFIX))
        if loaded_encoder_only:
            missing = [k for k in missing if k.startswith(BASE_PREFIX)]
        if strict and (missing or unexpected):
            raise ValueError(f"checkpoint in {directory} does not match {cls.__name__}: "
                             f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
        if dtype is not None:
            model = model.to(dtype)
        return model.eval()

    def save_pretrained(self, directory: str | Path, state_dict: dict | None = None) -> None:
        """config.json + model.safetensors; ``state_dict`` instead of the module's own (e.g. the
        gathered full state of an FSDP-sharded model)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        self.config.save_pretrained(directory)
        state = {k: v.contiguous() for k, v in (self.state_dict() if state_dict is None else state_dict).items()}
        for tied, source in self.tied_weights.items():
            if tied in state and source in state and state[tied].data_ptr() == state[source].data_ptr():
                del state[tied]  # stored once, as transformers does
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
