"""The text conditioning of each model family: what the UNet is given besides the latents, as a dict
of its keyword arguments (so that classifier-free guidance batches it entry by entry).

- SD 1.x and SD 2.x: `context`, the text encoder's final-normed hidden states at A1111's clip skip
  (SD 2.x's encoder is already OpenCLIP's penultimate layer: the loader drops the last).
- SDXL: `context`, both encoders' hidden states `clip_skip` layers before their last, not
  final-normed (clip skip 1: the penultimate layer, as SDXL was trained), side by side
  (768 + 1280 = 2048 wide); `text_embeds`, bigG's projected pooled output; `time_ids`, the size
  micro-conditioning: original size, crop top-left and target size, each (height, width); by
  default the image's size and (0, 0), as diffusers' StableDiffusionXLPipeline has them.

Prompts are read with A1111's syntax (mlx_sd.engine.prompt_weights): emphasis weights each
encoder's hidden states, textual inversion embeddings stand for their names' tokens (SDXL: `clip_l`
for the first encoder, `clip_g` for the second). Prompts longer than 75 tokens are encoded in
75-token windows whose hidden states are concatenated; SDXL's pooled output is the first window's,
unweighted, as A1111 has it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import mlx.core as mx

from mlx_sd.engine import prompt_weights
from mlx_sd.engine.errors import InvalidRequest
from mlx_sd.engine.request import GenerationRequest

if TYPE_CHECKING:
    from convert.assemble import ModelNetworks
    from mlx_sd.engine.extra_networks import Prepared
    from mlx_sd.engine.model_store import LoadedModel

Conditioning = dict[str, mx.array]
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the networks that encode prompts, in a family's order


def text_widths(models: ModelNetworks) -> dict[str, int]:
    """Each text encoder's name -> its width (what a textual inversion embedding for it must have)."""
    encoders = {name: getattr(models, name) for name in TEXT_ENCODERS}
    return {name: encoder.config.hidden_size for name, encoder in encoders.items() if encoder is not None}


def encode_prompts(model: LoadedModel, request: GenerationRequest, extras: Prepared,
                   ) -> tuple[Conditioning, Conditioning]:
    """The conditioning of the prompt and of the negative prompt (batch 1 each) for a validated
    request of resolved size, its prompts as `extras` has them (LoRA tags taken out, with the
    embeddings they use)."""
    models = model.models
    if models.text_encoder is None:
        raise InvalidRequest("model", f"{request.model or 'the default model'} is an {models.family.title} model, "
                                      "which runs only as the second stage of a base model")
    if models.text_encoder_2 is None:
        return _single_encoder(model, request, extras)
    return sdxl(model, request, extras)


def _check_clip_skip(request: GenerationRequest, layers: int, limit: int) -> None:
    if request.clip_skip > limit:
        raise InvalidRequest("clip_skip", f"must be at most {limit} for this model's text encoder of {layers} "
                                          f"layers (got {request.clip_skip})")


def _single_encoder(model: LoadedModel, request: GenerationRequest, extras: Prepared,
                    ) -> tuple[Conditioning, Conditioning]:
    encoder = model.models.text_encoder
    layers = len(encoder.encoder.layers)
    _check_clip_skip(request, layers, layers)
    hidden = prompt_weights.encode(encoder, model.tokenizer, [extras.prompt, extras.negative_prompt],
                                   request.clip_skip - 1, extras.embeddings.get("text_encoder"))
    return {"context": hidden[:1]}, {"context": hidden[1:]}


def sdxl(model: LoadedModel, request: GenerationRequest, extras: Prepared) -> tuple[Conditioning, Conditioning]:
    """SDXL's conditioning from the text encoders `model` has: both for a base model, OpenCLIP bigG
    alone for the refiner (whose `time_ids` mlx_sd.engine.refiner replaces)."""
    names = [name for name in TEXT_ENCODERS if getattr(model.models, name) is not None]
    encoders = [getattr(model.models, name) for name in names]
    layers = min(len(encoder.encoder.layers) for encoder in encoders)
    _check_clip_skip(request, layers, layers - 1)
    prompts = [extras.prompt, extras.negative_prompt]
    tokenizers = [model.tokenizer if name == TEXT_ENCODERS[0] else model.tokenizer_2 for name in names]
    found = [extras.embeddings.get(name) for name in names]
    encoded = [prompt_weights.weighted_windows(t, prompts, e) for t, e in zip(tokenizers, found)]
    windows = max(e[0].ids.shape[0] for e in encoded)  # the vocabularies may split a prompt differently
    encoded = [e if e[0].ids.shape[0] == windows else prompt_weights.weighted_windows(t, prompts, f, windows)
               for e, t, f in zip(encoded, tokenizers, found)]
    contexts, pooled = [], None
    for encoder, windowed in zip(encoders, encoded):
        ids, token_embeddings = prompt_weights.encoder_inputs(encoder, windowed)
        last = encoder is encoders[-1]  # bigG's pooled output
        hidden, pool = encoder.hidden_and_pooled(ids, request.clip_skip, pooled=last, token_embeddings=token_embeddings)
        contexts.append(prompt_weights.weighted(hidden, windowed))
        pooled = pool if last else pooled
    context = mx.concatenate(contexts, axis=-1)
    pooled = pooled.reshape(len(prompts), windows, -1)[:, 0].astype(mx.float32)
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
