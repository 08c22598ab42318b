"""A Draw Things GenerateImage request as our GenerationRequest, and our results as its responses.

Every setting of the configuration is in one group (a test checks that the groups cover the schema):
- MAPPED onto GenerationRequest (size, seed, steps, guidance, sampler, hires fix, ...);
- IGNORED_FOR_SPEED: they only tune speed or memory; the image is the same without them (logged);
- NOT_FOR_SD1: Draw Things itself ignores them for SD 1.x models, and they concern none of the
  families served (SD 1.x, SD 2.x, SDXL) (logged); SDXL's size micro-conditioning and its refiner's
  aesthetic scores are MAPPED (the other families ignore them);
- DEPENDENT: they act only through another setting that is refused when present (compression
  artifacts), or are the configuration's bookkeeping;
- REFUSED: they would change the image and we cannot honour them (FAILED_PRECONDITION naming them).

Known difference: a guidance scale or step count of 0 takes our documented default (7, 20), as 0
does in the documented API.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from grpc_service.drawthings import inputs, tensors
from grpc_service.drawthings.config import SLOTS, read_configuration
from grpc_service.generated import drawthings_pb2 as pb
from mlx_sd.engine import hires, img2img
from mlx_sd.engine.errors import InvalidRequest, UnsupportedSetting
from mlx_sd.engine.events import EventType, GeneratedImage, ProgressEvent
from mlx_sd.engine.lora import LoraWeight
from mlx_sd.engine.request import GenerationRequest

log = logging.getLogger(__name__)

LORA_REFINER_MODE = 2  # a LoRA's mode: 0 all models, 1 the base model, 2 the refiner
SIDE_UNIT = 64  # start_width, start_height and the hires fix's sizes count 64-pixel units
CHUNK_BYTES = 4 * 1024 * 1024  # with `chunked`, images over this are sent in pieces of this size
PREVIEW_EVERY = 5  # sampling steps between latent previews

# SamplerType and SeedMode values, by position.
SAMPLERS = (
    "DPM++ 2M Karras", "Euler a", "DDIM", "PLMS", "DPM++ SDE Karras", "UniPC", "LCM", "Euler a Substep",
    "DPM++ SDE Substep", "TCD", "Euler a Trailing", "DPM++ SDE Trailing", "DPM++ 2M AYS", "Euler a AYS",
    "DPM++ SDE AYS", "DPM++ 2M Trailing", "DDIM Trailing", "UniPC Trailing", "UniPC AYS", "TCD Trailing",
)
SEED_MODES = ("legacy", "torch_cpu", "scale_alike", "nvidia_gpu")

MAPPED = (
    "start_width", "start_height", "seed", "steps", "guidance_scale", "model", "sampler", "batch_count", "batch_size",
    "hires_fix", "hires_fix_start_width", "hires_fix_start_height", "hires_fix_strength", "seed_mode", "clip_skip",
    "face_restoration", "stochastic_sampling_gamma", "upscaler", "upscaler_scale_factor", "strength", "mask_blur",
    "preserve_original_after_inpaint", "mask_blur_outset", "loras",
    "refiner_model", "refiner_start", "aesthetic_score", "negative_aesthetic_score",
    *(SDXL_SIZES := {"original_image_width": "original_width", "original_image_height": "original_height",
                     "crop_top": "crop_top", "crop_left": "crop_left", "target_image_width": "target_width",
                     "target_image_height": "target_height", "negative_original_image_width": "negative_original_width",
                     "negative_original_image_height": "negative_original_height"}),
)
IGNORED_FOR_SPEED = (
    "tiled_decoding", "decoding_tile_width", "decoding_tile_height", "decoding_tile_overlap", "tiled_diffusion",
    "diffusion_tile_width", "diffusion_tile_height", "diffusion_tile_overlap", "tea_cache", "tea_cache_start",
    "tea_cache_end", "tea_cache_threshold", "tea_cache_max_skip_steps",
)
NOT_FOR_SD1 = (
    "image_guidance_scale", "clip_weight", "negative_prompt_for_image_prior", "image_prior_steps",
    "fps_id", "motion_bucket_id", "cond_aug", "start_frame_cfg", "num_frames",
    "stage_2_steps", "stage_2_cfg", "stage_2_shift", "t5_text_encoder", "separate_clip_l", "clip_l_text",
    "separate_open_clip_g", "open_clip_g_text", "speed_up_with_guidance_embed", "guidance_embed",
    "resolution_dependent_shift", "separate_t5", "t5_text", "causal_inference_enabled", "causal_inference",
    "causal_inference_pad", "cfg_zero_star", "cfg_zero_init_steps",
)
DEPENDENT = (
    "compression_artifacts_quality", "id", "name", "decode_with_attention",
    "hires_fix_decode_with_attention",
)
REFUSED: Mapping[str, str] = {
    "controls": "control networks are not supported yet",
    "sharpness": "sharpness is not supported",
    "shift": "a shifted noise schedule is not supported",
    "zero_negative_prompt": "a zeroed negative prompt is not supported",
    "compression_artifacts": "simulated compression artifacts are not supported",
    "color_calibration": "colour calibration is not supported",
    "expand_prompt_to_json": "prompt expansion is not supported",
}

_SIGNPOSTS = {  # EventType -> the signpost oneof's field
    EventType.TEXT_ENCODED: "textEncoded",
    EventType.IMAGE_ENCODED: "imageEncoded",
    EventType.SAMPLING: "sampling",
    EventType.IMAGE_DECODED: "imageDecoded",
    EventType.SECOND_PASS_IMAGE_ENCODED: "secondPassImageEncoded",
    EventType.SECOND_PASS_SAMPLING: "secondPassSampling",
    EventType.SECOND_PASS_IMAGE_DECODED: "secondPassImageDecoded",
    EventType.FACE_RESTORED: "faceRestored",
    EventType.IMAGE_UPSCALED: "imageUpscaled",
}
_STEPPED = ("sampling", "secondPassSampling")


def generation_request(message: pb.ImageGenerationRequest) -> GenerationRequest:
    """The validated GenerationRequest a Draw Things request asks for.

    Raises InvalidRequest for malformed input (naming the field) and UnsupportedSetting for a
    well-formed setting we cannot honour.
    """
    config = read_configuration(message.configuration)
    source = inputs.source(message)
    _check_settings(config)
    hires_fix = config["hires_fix"]
    if source is not None and hires_fix:
        raise UnsupportedSetting("hires_fix", "the hires fix is for text to image; with an input image it is not "
                                              "supported")
    request = GenerationRequest(
        prompt=message.prompt,
        negative_prompt=message.negativePrompt,
        width=config["start_width"] * SIDE_UNIT,
        height=config["start_height"] * SIDE_UNIT,
        steps=config["steps"],
        cfg_scale=config["guidance_scale"],
        seed=config["seed"],
        sampler=_enum("sampler", SAMPLERS, config["sampler"]),
        seed_mode=_enum("seed_mode", SEED_MODES, config["seed_mode"]),
        stochastic_sampling_gamma=config["stochastic_sampling_gamma"],
        restore_faces=bool(config["face_restoration"]),
        enable_hr=hires_fix,
        hires_first_width=config["hires_fix_start_width"] * SIDE_UNIT if hires_fix else 0,
        hires_first_height=config["hires_fix_start_height"] * SIDE_UNIT if hires_fix else 0,
        denoising_strength=config["hires_fix_strength"] if hires_fix else config["strength"] if source else 0.0,
        batch_size=config["batch_size"],
        batch_count=config["batch_count"],
        clip_skip=config["clip_skip"],
        model=config["model"],
        preview_every=PREVIEW_EVERY,
        # Any upscaler named runs as the one installed in the model directory (upscaler/model.safetensors).
        upscale=bool(config["upscaler"]),
        upscale_factor=config["upscaler_scale_factor"],
        refiner_model=config["refiner_model"],
        refiner_start=config["refiner_start"],
        aesthetic_score=config["aesthetic_score"],
        negative_aesthetic_score=config["negative_aesthetic_score"],
        # Image to image and inpainting (grpc_service/drawthings/inputs.py)
        source=source,
        mask_blur=round(config["mask_blur"]) if math.isfinite(config["mask_blur"]) else -1,
        inpaint_no_overlay=not config["preserve_original_after_inpaint"],
        mask_outset=config["mask_blur_outset"],
        # LoRAs, from the model directory's lora/ folder; those for a refiner alone have no model here.
        loras=tuple(LoraWeight(file, weight) for file, weight, mode in config["loras"] if mode != LORA_REFINER_MODE),
        **{ours: config[theirs] for theirs, ours in SDXL_SIZES.items()},
    )
    return request.validated()


def _enum(field: str, names: Sequence[str], value: int) -> str:
    if not 0 <= value < len(names):
        raise InvalidRequest(field, f"unknown value {value}; known: 0 to {len(names) - 1}")
    return names[value]


def _check_settings(config: Mapping[str, Any]) -> None:
    changed = [name for name in (*IGNORED_FOR_SPEED, *NOT_FOR_SD1) if config[name] != SLOTS[name].default]
    if changed:
        log.info("ignoring Draw Things settings that do not apply here: %s", ", ".join(changed))
    for name, why in REFUSED.items():
        if config[name] != SLOTS[name].default:
            raise UnsupportedSetting(name, why)


def expected_signposts(request: GenerationRequest) -> list[pb.ImageGenerationSignpostProto]:
    """The signposts a run of `request` passes, each sampling pass marked by its last step."""
    expected = [_signpost(EventType.TEXT_ENCODED)]
    steps = request.steps
    if request.source is not None:  # image to image runs the last steps of the schedule
        expected.append(_signpost(EventType.IMAGE_ENCODED))
        steps -= img2img.start_index(request.steps, request.denoising_strength)
    expected += [_signpost(EventType.SAMPLING, steps), _signpost(EventType.IMAGE_DECODED)]
    if request.enable_hr:
        second_pass = request.steps - hires.img2img_start(request.steps, request.denoising_strength)
        expected += [_signpost(EventType.IMAGE_UPSCALED), _signpost(EventType.SECOND_PASS_IMAGE_ENCODED),
                     _signpost(EventType.SECOND_PASS_SAMPLING, second_pass),
                     _signpost(EventType.SECOND_PASS_IMAGE_DECODED)]
    if request.restore_faces:
        expected.append(_signpost(EventType.FACE_RESTORED))
    if request.upscale:
        expected.append(_signpost(EventType.IMAGE_UPSCALED))
    return expected


def _signpost(event: EventType, step: int | None = None) -> pb.ImageGenerationSignpostProto:
    signpost = pb.ImageGenerationSignpostProto()
    case = _SIGNPOSTS[event]
    # Setting the case's message (even an empty one) is what sets the oneof; clients abort without it.
    getattr(signpost, case).SetInParent()
    if case in _STEPPED:
        getattr(signpost, case).step = step or 0
    return signpost


def progress_response(event: ProgressEvent, signposts: Sequence[pb.ImageGenerationSignpostProto],
                      compress: bool) -> pb.ImageGenerationResponse:
    response = pb.ImageGenerationResponse(currentSignpost=_signpost(event.type, event.step), signposts=signposts)
    if event.preview is not None:
        response.previewImage = tensors.encode_latents(event.preview, compress)
    return response


def image_responses(images: Sequence[GeneratedImage], compress: bool, chunked: bool
                    ) -> Iterator[pb.ImageGenerationResponse]:
    """The total size, then each image as a tensor (in 4 MiB pieces when the client takes chunks and
    there is more than that in all), with its scale against the requested width (the model's native
    one where the request left it to the model); without images, a single closing message."""
    encoded = [tensors.encode_image(image.pixels, compress) for image in images]
    total = sum(map(len, encoded))
    if not encoded:
        yield pb.ImageGenerationResponse(scaleFactor=1, chunkState=pb.LAST_CHUNK)
        return
    yield pb.ImageGenerationResponse(downloadSize=total)
    piece = CHUNK_BYTES if chunked and total > CHUNK_BYTES else None
    for image, data in zip(images, encoded):
        starts = range(0, len(data), piece) if piece else [0]
        for start in starts:
            end = start + piece if piece else len(data)
            yield pb.ImageGenerationResponse(
                generatedImages=[data[start:end]], scaleFactor=image.pixels.shape[1] // image.parameters.width,
                chunkState=pb.LAST_CHUNK if end >= len(data) else pb.MORE_CHUNKS)
