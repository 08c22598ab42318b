"""The text conditioning of each model family: what the UNet is given besides the latents, as a dict
of its keyword arguments (so that classifier-free guidance batches it entry by entry).

- SD 1.x and SD 2.x: `context`, the text encoder's final-normed hidden states at A1111's clip skip
  (SD 2.x's encoder is already OpenCLIP's penultimate layer: the loader drops the last).
- SDXL: `context`, both encoders' hidden states `clip_skip` layers before their last, not
  final-normed (clip skip 1: the penultimate layer, as SDXL was trained), side by side
  (768 + 1280 = 2048 wide); `text_embeds`, bigG's projected pooled output; `time_ids`, the size
  micro-conditioning: original size, crop top-left and target size, each (height, width); by
  default the image's size and (0, 0), as diffusers' StableDiffusionXLPipeline has them.

Prompts longer than 75 tokens are encoded in 75-token windows whose hidden states are concatenated
(A1111's way, see mlx_sd.engine.tokenizer); SDXL's pooled output is the first window's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.request import GenerationRequest

if TYPE_CHECKING:
    from mlx_sd.engine.model_store import LoadedModel

Conditioning = dict[str, mx.array]


def encode_prompts(model: LoadedModel, request: GenerationRequest) -> tuple[Conditioning, Conditioning]:
    """The conditioning of the prompt and of the negative prompt (batch 1 each) for a validated
    request of resolved size."""
    models = model.models
    if models.text_encoder is None:
        raise InvalidRequest("model", f"{request.model or 'the default model'} is an {models.family.title} model, "
                                      "which runs only as the second stage of a base model")
    if models.text_encoder_2 is None:
        return _single_encoder(model, request)
    return _sdxl(model, request)


def _check_clip_skip(request: GenerationRequest, layers: int, limit: int) -> None:
    if request.clip_skip > limit:
        raise InvalidRequest("clip_skip", f"must be at most {limit} for this model's text encoder of {layers} "
                                          f"layers (got {request.clip_skip})")


def _single_encoder(model: LoadedModel, request: GenerationRequest) -> tuple[Conditioning, Conditioning]:
    layers = len(model.models.text_encoder.encoder.layers)
    _check_clip_skip(request, layers, layers)
    ids = model.tokenizer.tokenize_windows([request.prompt, request.negative_prompt])
    prompts, windows, length = ids.shape
    hidden = model.models.text_encoder(mx.array(ids.reshape(prompts * windows, length)),
                                       skip_last_layers=request.clip_skip - 1)
    hidden = hidden.reshape(prompts, windows * length, hidden.shape[-1]).astype(mx.float32)
    mx.eval(hidden)
    return {"context": hidden[:1]}, {"context": hidden[1:]}


def _sdxl(model: LoadedModel, request: GenerationRequest) -> tuple[Conditioning, Conditioning]:
    encoders = (model.models.text_encoder, model.models.text_encoder_2)
    layers = min(len(encoder.encoder.layers) for encoder in encoders)
    _check_clip_skip(request, layers, layers - 1)
    prompts = [request.prompt, request.negative_prompt]
    ids = model.tokenizer.tokenize_windows(prompts)
    ids_2 = model.tokenizer_2.tokenize_windows(prompts, min_windows=ids.shape[1])
    if ids_2.shape[1] > ids.shape[1]:  # the vocabularies split a prompt differently
        ids = model.tokenizer.tokenize_windows(prompts, min_windows=ids_2.shape[1])
    count, windows, length = ids.shape
    hidden, _ = encoders[0].hidden_and_pooled(mx.array(ids.reshape(-1, length)), request.clip_skip, pooled=False)
    hidden_2, pooled = encoders[1].hidden_and_pooled(mx.array(ids_2.reshape(-1, length)), request.clip_skip)
    context = mx.concatenate([hidden, hidden_2], axis=-1).reshape(count, windows * length, -1).astype(mx.float32)
    pooled = pooled.reshape(count, windows, -1)[:, 0].astype(mx.float32)
    mx.eval(context, pooled)
    return ({"context": context[:1], "text_embeds": pooled[:1], "time_ids": _time_ids(request, negative=False)},
            {"context": context[1:], "text_embeds": pooled[1:], "time_ids": _time_ids(request, negative=True)})


def _time_ids(request: GenerationRequest, negative: bool) -> mx.array:
    """(1, 6): original (height, width), crop (top, left), target (height, width); a size of 0 is the
    image's, and the negative prompt's original size falls back to the prompt's."""
    original = (request.original_height or request.height, request.original_width or request.width)
    if negative:
        original = (request.negative_original_height or original[0], request.negative_original_width or original[1])
    target = (request.target_height or request.height, request.target_width or request.width)
    return mx.array([[*original, request.crop_top, request.crop_left, *target]], dtype=mx.float32)
