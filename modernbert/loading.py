"""from_pretrained / save_pretrained: config.json + safetensors with HF key names, from a local
folder or a Hub repo id (modernbert.hub). Models are built on the meta device and take the
checkpoint's tensors as their parameters, so loading never initializes weights it then overwrites.
An int8 checkpoint (written by a model that went through quantize_int8) loads as the int8 model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModernBertConfig
from .hub import resolve

BASE_PREFIX = "model."


def read_state_dict(directory: str | Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    from safetensors.torch import load_file

    def load(path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path), device=str(device))
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
    def from_pretrained(cls, name_or_path: str | Path, dtype: torch.dtype | None = None, strict: bool = True, *,
                        config: ModernBertConfig | None = None, ignore_mismatched_sizes: bool = False,
                        device: torch.device | str | None = None, revision: str | None = None,
                        cache_dir: str | Path | None = None, local_files_only: bool = False):
        """Build from config.json and the safetensors weights of a local folder or a Hub repo id
        (``revision``, ``cache_dir``; offline with ``local_files_only`` or HF_HUB_OFFLINE=1).

        With ``strict``, a weight the model needs but the checkpoint lacks is an error, except the
        task head's when loading an encoder-only checkpoint into a head model (as transformers,
        these are initialized fresh) and tied weights. ``dtype`` / ``device``: where the weights
        go (default fp32 on the CPU; int8 weights stay int8). ``config`` replaces the folder's
        (e.g. other labels). A checkpoint tensor of another shape than the model's is an error;
        with ``ignore_mismatched_sizes`` one in the task head is left out and initialized fresh
        (a classifier for a new label set), one in the encoder is still an error (another model).
        """
        from .quantize import QUANT_METHOD, int8_layers_like

        directory = resolve(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        config = config or ModernBertConfig.from_pretrained(directory)
        device = torch.device(device or "cpu")
        with torch.device("meta"):
            model = cls(config)
        state = _align_prefix(read_state_dict(directory, device), set(model.state_dict()))
        if (config.extra.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD:
            int8_layers_like(model, state)
        expected = model.state_dict()
        mismatched = {k: (tuple(v.shape), tuple(expected[k].shape)) for k, v in state.items()
                      if k in expected and v.shape != expected[k].shape}
        is_head_model = any(k.startswith(BASE_PREFIX) for k in expected)
        in_encoder = [k for k in mismatched if k.startswith(BASE_PREFIX) or not is_head_model]
        if in_encoder or (mismatched and not ignore_mismatched_sizes):
            shown = ", ".join(f"{k} {mismatched[k][0]} (model {mismatched[k][1]})"
                              for k in sorted(in_encoder or mismatched)[:4])
            raise ValueError(f"checkpoint in {name_or_path} has tensors of other shapes than {cls.__name__}: {shown}"
                             + ("" if in_encoder else "; ignore_mismatched_sizes=True initializes them fresh"))
        state = {k: v for k, v in state.items() if k not in mismatched}
        missing = [k for k in expected if k not in state and k not in cls.tied_weights and k not in mismatched]
        unexpected = [k for k in state if k not in expected]
        loaded_encoder_only = not any(k in state for k in expected if not k.startswith(BASE_PREFIX))
        if loaded_encoder_only:
            missing = [k for k in missing if k.startswith(BASE_PREFIX)]
        if strict and (missing or unexpected):
            raise ValueError(f"checkpoint in {name_or_path} does not match {cls.__name__}: "
                             f"missing {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
        # Floating tensors take the model's dtype (fp32 as built) or ``dtype``: one conversion.
        state = {k: v.to(dtype or expected[k].dtype) if v.is_floating_point() else v
                 for k, v in state.items() if k in expected}
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        _initialize_what_was_not_loaded(model, device)
        if dtype is not None:
            model = model.to(dtype)  # the freshly initialized head, if any
        return model.eval()

    def tie_weights(self) -> None:
        """Point each tied parameter at its source (after loading replaced the source)."""
        if not getattr(self.config, "tie_word_embeddings", True):
            return
        for tied, source in self.tied_weights.items():
            module_name, _, attribute = tied.rpartition(".")
            setattr(self.get_submodule(module_name), attribute, self.get_parameter(source))

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


def _initialize_what_was_not_loaded(model: torch.nn.Module, device: torch.device) -> None:
    """Tensors still on the meta device get memory: a module the checkpoint lacks entirely (a task
    head an encoder-only checkpoint has no weights for) its own initialization, a tensor missing
    beside loaded ones zeros."""
    for module in model.modules():
        tensors = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        missing = {name for name, t in tensors.items() if t is not None and t.is_meta}
        if not missing:
            continue
        if len(missing) == len([t for t in tensors.values() if t is not None]):
            module.to_empty(device=device, recurse=False)
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            continue
        for name in missing:
            tensor = tensors[name]
            zeros = torch.zeros(tensor.shape, dtype=tensor.dtype, device=device)
            if isinstance(tensor, torch.nn.Parameter):
                setattr(module, name, torch.nn.Parameter(zeros, requires_grad=tensor.requires_grad))
            else:
                setattr(module, name, zeros)
