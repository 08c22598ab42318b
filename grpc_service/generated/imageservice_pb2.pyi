from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EchoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EchoResponse(_message.Message):
    __slots__ = ("message",)
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    message: str
    def __init__(self, message: _Optional[str] = ...) -> None: ...

class FilesExistRequest(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, files: _Optional[_Iterable[str]] = ...) -> None: ...

class FilesExistResponse(_message.Message):
    __slots__ = ("files", "exists", "errors")
    FILES_FIELD_NUMBER: _ClassVar[int]
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedScalarFieldContainer[str]
    exists: _containers.RepeatedScalarFieldContainer[bool]
    errors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, files: _Optional[_Iterable[str]] = ..., exists: _Optional[_Iterable[bool]] = ..., errors: _Optional[_Iterable[str]] = ...) -> None: ...

class ImageGenerationRequest(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "width", "height", "steps", "cfg_scale", "seed", "sampler", "restore_faces", "enable_hr", "denoising_strength", "batch_size", "batch_count", "upscale", "upscale_factor", "refiner_model", "refiner_start", "aesthetic_score", "negative_aesthetic_score", "model", "init_image", "mask", "mask_blur", "resize_mode", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_fill", "inpaint_no_overlay", "mask_outset", "loras", "clip_skip")
    class ResizeMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        JUST_RESIZE: _ClassVar[ImageGenerationRequest.ResizeMode]
        CROP_AND_RESIZE: _ClassVar[ImageGenerationRequest.ResizeMode]
        RESIZE_AND_FILL: _ClassVar[ImageGenerationRequest.ResizeMode]
    JUST_RESIZE: ImageGenerationRequest.ResizeMode
    CROP_AND_RESIZE: ImageGenerationRequest.ResizeMode
    RESIZE_AND_FILL: ImageGenerationRequest.ResizeMode
    class InpaintingFill(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ORIGINAL: _ClassVar[ImageGenerationRequest.InpaintingFill]
        FILL: _ClassVar[ImageGenerationRequest.InpaintingFill]
        LATENT_NOISE: _ClassVar[ImageGenerationRequest.InpaintingFill]
        LATENT_NOTHING: _ClassVar[ImageGenerationRequest.InpaintingFill]
    ORIGINAL: ImageGenerationRequest.InpaintingFill
    FILL: ImageGenerationRequest.InpaintingFill
    LATENT_NOISE: ImageGenerationRequest.InpaintingFill
    LATENT_NOTHING: ImageGenerationRequest.InpaintingFill
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLER_FIELD_NUMBER: _ClassVar[int]
    RESTORE_FACES_FIELD_NUMBER: _ClassVar[int]
    ENABLE_HR_FIELD_NUMBER: _ClassVar[int]
    DENOISING_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    BATCH_COUNT_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_FIELD_NUMBER: _ClassVar[int]
    UPSCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    REFINER_MODEL_FIELD_NUMBER: _ClassVar[int]
    REFINER_START_FIELD_NUMBER: _ClassVar[int]
    AESTHETIC_SCORE_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_AESTHETIC_SCORE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    MASK_BLUR_FIELD_NUMBER: _ClassVar[int]
    RESIZE_MODE_FIELD_NUMBER: _ClassVar[int]
    INPAINT_FULL_RES_FIELD_NUMBER: _ClassVar[int]
    INPAINT_FULL_RES_PADDING_FIELD_NUMBER: _ClassVar[int]
    INPAINTING_FILL_FIELD_NUMBER: _ClassVar[int]
    INPAINT_NO_OVERLAY_FIELD_NUMBER: _ClassVar[int]
    MASK_OUTSET_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    CLIP_SKIP_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int
    sampler: str
    restore_faces: bool
    enable_hr: bool
    denoising_strength: float
    batch_size: int
    batch_count: int
    upscale: bool
    upscale_factor: int
    refiner_model: str
    refiner_start: float
    aesthetic_score: float
    negative_aesthetic_score: float
    model: str
    init_image: bytes
    mask: bytes
    mask_blur: int
    resize_mode: ImageGenerationRequest.ResizeMode
    inpaint_full_res: bool
    inpaint_full_res_padding: int
    inpainting_fill: ImageGenerationRequest.InpaintingFill
    inpaint_no_overlay: bool
    mask_outset: int
    loras: _containers.RepeatedCompositeFieldContainer[LoraWeight]
    clip_skip: int
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., cfg_scale: _Optional[float] = ..., seed: _Optional[int] = ..., sampler: _Optional[str] = ..., restore_faces: _Optional[bool] = ..., enable_hr: _Optional[bool] = ..., denoising_strength: _Optional[float] = ..., batch_size: _Optional[int] = ..., batch_count: _Optional[int] = ..., upscale: _Optional[bool] = ..., upscale_factor: _Optional[int] = ..., refiner_model: _Optional[str] = ..., refiner_start: _Optional[float] = ..., aesthetic_score: _Optional[float] = ..., negative_aesthetic_score: _Optional[float] = ..., model: _Optional[str] = ..., init_image: _Optional[bytes] = ..., mask: _Optional[bytes] = ..., mask_blur: _Optional[int] = ..., resize_mode: _Optional[_Union[ImageGenerationRequest.ResizeMode, str]] = ..., inpaint_full_res: _Optional[bool] = ..., inpaint_full_res_padding: _Optional[int] = ..., inpainting_fill: _Optional[_Union[ImageGenerationRequest.InpaintingFill, str]] = ..., inpaint_no_overlay: _Optional[bool] = ..., mask_outset: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[LoraWeight, _Mapping]]] = ..., clip_skip: _Optional[int] = ...) -> None: ...

class LoraWeight(_message.Message):
    __slots__ = ("file", "weight")
    FILE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    file: str
    weight: float
    def __init__(self, file: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class ImageGenerationResponse(_message.Message):
    __slots__ = ("images", "info", "events")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    info: _containers.RepeatedScalarFieldContainer[str]
    events: _containers.RepeatedCompositeFieldContainer[SignpostEvent]
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., info: _Optional[_Iterable[str]] = ..., events: _Optional[_Iterable[_Union[SignpostEvent, _Mapping]]] = ...) -> None: ...

class SignpostEvent(_message.Message):
    __slots__ = ("name", "timestamp", "type", "step", "total")
    class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        TEXT_ENCODED: _ClassVar[SignpostEvent.EventType]
        IMAGE_DECODED: _ClassVar[SignpostEvent.EventType]
        IMAGE_ENCODED: _ClassVar[SignpostEvent.EventType]
        SAMPLING: _ClassVar[SignpostEvent.EventType]
        FACE_RESTORED: _ClassVar[SignpostEvent.EventType]
        IMAGE_UPSCALED: _ClassVar[SignpostEvent.EventType]
        SECOND_PASS_IMAGE_DECODED: _ClassVar[SignpostEvent.EventType]
        SECOND_PASS_IMAGE_ENCODED: _ClassVar[SignpostEvent.EventType]
        SECOND_PASS_SAMPLING: _ClassVar[SignpostEvent.EventType]
    TEXT_ENCODED: SignpostEvent.EventType
    IMAGE_DECODED: SignpostEvent.EventType
    IMAGE_ENCODED: SignpostEvent.EventType
    SAMPLING: SignpostEvent.EventType
    FACE_RESTORED: SignpostEvent.EventType
    IMAGE_UPSCALED: SignpostEvent.EventType
    SECOND_PASS_IMAGE_DECODED: SignpostEvent.EventType
    SECOND_PASS_IMAGE_ENCODED: SignpostEvent.EventType
    SECOND_PASS_SAMPLING: SignpostEvent.EventType
    NAME_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    timestamp: int
    type: SignpostEvent.EventType
    step: int
    total: int
    def __init__(self, name: _Optional[str] = ..., timestamp: _Optional[int] = ..., type: _Optional[_Union[SignpostEvent.EventType, str]] = ..., step: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class UploadFileRequest(_message.Message):
    __slots__ = ("filename", "chunk_data", "sha256")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    CHUNK_DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    filename: str
    chunk_data: bytes
    sha256: str
    def __init__(self, filename: _Optional[str] = ..., chunk_data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class UploadFileResponse(_message.Message):
    __slots__ = ("success", "message")
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    success: bool
    message: str
    def __init__(self, success: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...
