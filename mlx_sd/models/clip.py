"""The CLIP text encoders in MLX: OpenAI's ViT-L/14 (SD-1, SDXL's first), OpenCLIP's ViT-H (SD-2) and
ViT-bigG (SDXL's second, with the projection of its pooled output).

Parameter names follow transformers' `text_model.*` with that prefix dropped, and its
`CLIPTextModelWithProjection`'s `text_projection`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlx_sd.models.layers import attention


class QuickGELU(nn.Module):
    """OpenAI CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x), which its weights were trained with."""

    def __call__(self, x: mx.array) -> mx.array:
        return x * mx.sigmoid(1.702 * x)


# GELU is the exact (erf) form.
_ACTIVATIONS = {"quick_gelu": QuickGELU, "gelu": nn.GELU}


@dataclass(frozen=True)
class CLIPTextConfig:
    """Keyed like transformers' `text_encoder/config.json`; defaults are CLIP ViT-L/14's."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # The width of `text_projection`, which only CLIPTextModelWithProjection has (SDXL's bigG).
    text_projection_dim: int | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> CLIPTextConfig:
        """Build from a transformers config dict (or our own); unknown keys are ignored. transformers
        writes a `projection_dim` into every CLIP config; it counts only for the architecture with
        the projection."""
        if config.get("hidden_act", "quick_gelu") not in _ACTIVATIONS:
            raise ValueError(f"unsupported CLIP config: hidden_act={config['hidden_act']!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in config.items() if k in names}
        if "CLIPTextModelWithProjection" in config.get("architectures", ()):
            values["text_projection_dim"] = config["projection_dim"]
        return cls(**values)


class CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.pad_heads = False  # see mlx_sd.models.layers.attention
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True,
                                       pad_heads=self.pad_heads))


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.activation_fn = _ACTIVATIONS[config.hidden_act]()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(self.activation_fn(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def __call__(self, x: mx.array) -> mx.array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def __call__(self, input_ids: mx.array, token_embeddings: mx.array | None = None) -> mx.array:
        """`token_embeddings` (B, tokens, C), when given, stand for the ids' own (textual inversion)."""
        positions = mx.arange(input_ids.shape[1])
        tokens = self.token_embedding(input_ids) if token_embeddings is None else token_embeddings
        return tokens + self.position_embedding(positions)[None]


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.layers = [CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)]


class CLIPTextModel(nn.Module):
    """Token ids (B, tokens) -> hidden states (B, tokens, hidden_size) for the UNet's cross-attention."""

    def __init__(self, config: CLIPTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = CLIPEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.text_projection_dim is not None:
            self.text_projection = nn.Linear(config.hidden_size, config.text_projection_dim, bias=False)

    def __call__(self, input_ids: mx.array, skip_last_layers: int = 0,
                 token_embeddings: mx.array | None = None) -> mx.array:
        """`skip_last_layers=1` is "CLIP skip 2": the penultimate layer's output, still final-normed.
        `token_embeddings` replace the ids' embeddings (see CLIPEmbeddings)."""
        if not 0 <= skip_last_layers < len(self.encoder.layers):
            raise ValueError(f"skip_last_layers must be in [0, {len(self.encoder.layers)}), got {skip_last_layers}")
        x = self.embeddings(input_ids, token_embeddings)
        for layer in self.encoder.layers[: len(self.encoder.layers) - skip_last_layers]:
            x = layer(x)
        return self.final_layer_norm(x)

    def hidden_and_pooled(self, input_ids: mx.array, skip_last_layers: int = 1, pooled: bool = True,
                          token_embeddings: mx.array | None = None) -> tuple[mx.array, mx.array | None]:
        """SDXL's reading: the hidden states `skip_last_layers` layers before the last, not
        final-normed (transformers' `hidden_states[-1 - skip_last_layers]`), and, with `pooled`,
        the final-normed state at each row's end-of-text token (the highest id, as transformers
        finds it), projected where the model has `text_projection`. `token_embeddings` as in `__call__`."""
        layers = self.encoder.layers
        if not 0 <= skip_last_layers < len(layers):
            raise ValueError(f"skip_last_layers must be in [0, {len(layers)}), got {skip_last_layers}")
        keep = len(layers) - skip_last_layers
        x = self.embeddings(input_ids, token_embeddings)
        hidden = x
        for layer in layers[: len(layers) if pooled else keep]:
            x = layer(x)
            keep -= 1
            if keep == 0:
                hidden = x
        if not pooled:
            return hidden, None
        ends = self.final_layer_norm(x)[mx.arange(x.shape[0]), mx.argmax(input_ids, axis=-1)]
        return hidden, self.text_projection(ends) if "text_projection" in self else ends
