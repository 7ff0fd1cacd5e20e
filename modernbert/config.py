"""ModernBertConfig: the fields of Hugging Face's config.json, read and written under their names."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

DEFAULT_GLOBAL_ROPE_THETA = 160_000.0
DEFAULT_LOCAL_ROPE_THETA = 10_000.0
# The fields that fix the weights' shapes: a config.json without them describes no model.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass
class ModernBertConfig:
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    hidden_activation: str = "gelu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    norm_eps: float = 1e-5
    norm_bias: bool = False
    pad_token_id: int = 50283
    eos_token_id: int = 50282
    bos_token_id: int = 50281
    cls_token_id: int = 50281
    sep_token_id: int = 50282
    attention_bias: bool = False
    attention_dropout: float = 0.0
    local_attention: int = 128
    global_attn_every_n_layers: int = 3
    global_rope_theta: float = DEFAULT_GLOBAL_ROPE_THETA
    local_rope_theta: float = DEFAULT_LOCAL_ROPE_THETA
    layer_types: list | None = None
    embedding_dropout: float = 0.0
    mlp_bias: bool = False
    mlp_dropout: float = 0.0
    decoder_bias: bool = True
    classifier_pooling: str = "cls"
    classifier_dropout: float = 0.0
    classifier_bias: bool = False
    classifier_activation: str = "gelu"
    tie_word_embeddings: bool = True
    id2label: dict | None = None
    # Compression (issue #7; absent from Hugging Face's ModernBERT, written only when set):
    # heads removed per layer, by their original index (transformers' PretrainedConfig name), and
    # ALBERT-style sharing: the layers split into num_hidden_groups runs that share one set of weights.
    pruned_heads: dict | None = None
    num_hidden_groups: int | None = None
    # Keys this class does not model (architectures, torch_dtype, ...), kept for round trips.
    extra: dict = dataclasses.field(default_factory=dict, repr=False)

    def __post_init__(self):
        self._check_types()
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        if self.layer_types is None:
            self.layer_types = [
                "full_attention" if i % self.global_attn_every_n_layers == 0 else "sliding_attention"
                for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        if self.num_hidden_groups is not None and (
            self.num_hidden_groups < 1 or self.num_hidden_layers % self.num_hidden_groups
        ):
            raise ValueError(f"num_hidden_groups={self.num_hidden_groups} must divide num_hidden_layers="
                             f"{self.num_hidden_layers}")
        if self.pruned_heads:
            self.pruned_heads = {int(k): sorted(int(h) for h in v) for k, v in self.pruned_heads.items()}
            if self.num_hidden_groups is not None:
                raise ValueError("pruned_heads and num_hidden_groups cannot be combined")
        if self.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling must be 'cls' or 'mean', got {self.classifier_pooling!r}")

    def _check_types(self) -> None:
        """A mistyped config.json field (a string for a size, ...) is an error naming the field."""
        expected = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
        for field in dataclasses.fields(self):
            types = expected.get(field.type)
            value = getattr(self, field.name)
            if types is None or (value is None and field.name.endswith("_token_id")):
                continue
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
                raise TypeError(f"config field {field.name} must be {field.type}, got {value!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def sliding_window(self) -> int:
        """Tokens seen on each side by local layers: |i - j| <= local_attention // 2."""
        return self.local_attention // 2

    @property
    def num_labels(self) -> int:
        return len(self.id2label) if self.id2label else 2

    def layer_group(self, layer: int) -> int:
        """The index of the weights layer ``layer`` runs with (itself unless layers are shared)."""
        if self.num_hidden_groups is None:
            return layer
        return layer * self.num_hidden_groups // self.num_hidden_layers

    def is_global(self, layer: int) -> bool:
        return self.layer_types[layer] == "full_attention"

    def rope_theta(self, layer: int) -> float:
        return self.global_rope_theta if self.is_global(layer) else self.local_rope_theta

    @classmethod
    def from_dict(cls, values: dict) -> "ModernBertConfig":
        values = dict(values)
        model_type = values.get("model_type", "modernbert")
        if model_type != "modernbert":
            raise ValueError(f"this is a config for a {model_type!r} model, not ModernBERT (model_type 'modernbert')")
        # transformers 5 writes per-layer-type RoPE parameters instead of the two thetas.
        rope = values.pop("rope_parameters", None) or {}
        if "full_attention" in rope:
            values.setdefault("global_rope_theta", rope["full_attention"].get("rope_theta", DEFAULT_GLOBAL_ROPE_THETA))
        if "sliding_attention" in rope:
            values.setdefault("local_rope_theta", rope["sliding_attention"].get("rope_theta", DEFAULT_LOCAL_ROPE_THETA))
        # Derived on writing: the half window, the reverse label map, the model type.
        if "sliding_window" in values and "local_attention" not in values:
            values["local_attention"] = 2 * values["sliding_window"]
        for derived in ("sliding_window", "label2id", "model_type"):
            values.pop(derived, None)
        if values.get("id2label"):
            values["id2label"] = {int(k): v for k, v in values["id2label"].items()}
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in values.items() if k not in known}
        return cls(**{k: v for k, v in values.items() if k in known}, extra=extra)

    def to_dict(self) -> dict:
        values = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        values = {**self.extra, **values}
        values["model_type"] = "modernbert"
        values["sliding_window"] = self.sliding_window
        values["rope_parameters"] = {
            "full_attention": {"rope_type": "default", "rope_theta": self.global_rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta},
        }
        for optional in ("id2label", "pruned_heads", "num_hidden_groups"):
            if not values[optional]:
                del values[optional]
        if self.id2label is not None:
            values["label2id"] = {v: k for k, v in self.id2label.items()}
        return values

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, revision: str | None = None,
                        cache_dir: str | Path | None = None, local_files_only: bool = False) -> "ModernBertConfig":
        """config.json of a local folder or a Hub repo id (see modernbert.hub.resolve)."""
        from .hub import resolve

        directory = resolve(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        path = Path(directory) / "config.json"
        if not path.exists():
            raise FileNotFoundError(f"no config.json in {name_or_path}")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        missing = [name for name in REQUIRED_FIELDS if name not in values]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}: the model's shape cannot be known")
        return cls.from_dict(values)

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))
