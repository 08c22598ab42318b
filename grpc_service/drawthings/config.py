"""Reads Draw Things' generation configuration: a FlatBuffer of the table GenerationConfiguration.

The buffer is a plain finished FlatBuffer (no file identifier, no size prefix). Writers omit fields
equal to their default, so every field is read from FIELDS, one row per slot: its name, slot number,
type and default. The bytes come from the network, so every offset is checked against the buffer
before it is followed (the flatbuffers runtime trusts its input); a malformed buffer is an
InvalidRequest naming `configuration`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flatbuffers import number_types as N
from flatbuffers.table import Table

from mlx_sd.engine.errors import InvalidRequest

MAX_CONFIGURATION_BYTES = 1024 * 1024
MAX_LIST_ITEMS = 256  # LoRAs or controls in one configuration
MAX_STRING_BYTES = 64 * 1024
_UOFFSET = N.UOffsetTFlags.bytewidth


class Kind(enum.Enum):
    """A field's FlatBuffers type; `flags` reads it (None: an offset to follow)."""

    BOOL = N.BoolFlags
    BYTE = N.Int8Flags  # the schema's enums are all `byte`
    UBYTE = N.Uint8Flags
    USHORT = N.Uint16Flags
    INT = N.Int32Flags
    UINT = N.Uint32Flags
    LONG = N.Int64Flags
    FLOAT = N.Float32Flags
    STRING = "string"
    FILES = "files"  # a vector of tables whose slot 0 is a file name (Control)
    LORAS = "loras"  # a vector of LoRA tables: (file, weight, mode) each


@dataclass(frozen=True)
class Field:
    name: str
    slot: int
    kind: Kind
    default: Any = 0


def _fields(*rows: tuple[str, Kind] | tuple[str, Kind, Any]) -> tuple[Field, ...]:
    """Rows in slot order: the slot is the row's position."""
    return tuple(Field(row[0], slot, row[1], *row[2:]) for slot, row in enumerate(rows))


K = Kind
FIELDS: tuple[Field, ...] = _fields(
    ("id", K.LONG), ("start_width", K.USHORT), ("start_height", K.USHORT), ("seed", K.UINT),
    ("steps", K.UINT), ("guidance_scale", K.FLOAT), ("strength", K.FLOAT), ("model", K.STRING, ""),
    ("sampler", K.BYTE), ("batch_count", K.UINT, 1), ("batch_size", K.UINT, 1), ("hires_fix", K.BOOL, False),
    ("hires_fix_start_width", K.USHORT), ("hires_fix_start_height", K.USHORT), ("hires_fix_strength", K.FLOAT, 0.7),
    ("upscaler", K.STRING, ""), ("image_guidance_scale", K.FLOAT, 1.5), ("seed_mode", K.BYTE), ("clip_skip", K.UINT, 1),
    ("controls", K.FILES, ()), ("loras", K.LORAS, ()), ("mask_blur", K.FLOAT), ("face_restoration", K.STRING, ""),
    ("decode_with_attention", K.BOOL, True), ("hires_fix_decode_with_attention", K.BOOL, True),  # deprecated
    ("clip_weight", K.FLOAT, 1.0), ("negative_prompt_for_image_prior", K.BOOL, True), ("image_prior_steps", K.UINT, 5),
    ("refiner_model", K.STRING, ""), ("original_image_height", K.UINT), ("original_image_width", K.UINT),
    ("crop_top", K.INT), ("crop_left", K.INT), ("target_image_height", K.UINT), ("target_image_width", K.UINT),
    ("aesthetic_score", K.FLOAT, 6.0), ("negative_aesthetic_score", K.FLOAT, 2.5), ("zero_negative_prompt", K.BOOL, False),
    ("refiner_start", K.FLOAT, 0.7), ("negative_original_image_height", K.UINT),
    ("negative_original_image_width", K.UINT), ("name", K.STRING, ""), ("fps_id", K.UINT, 5),
    ("motion_bucket_id", K.UINT, 127), ("cond_aug", K.FLOAT, 0.02), ("start_frame_cfg", K.FLOAT, 1.0),
    ("num_frames", K.UINT, 14), ("mask_blur_outset", K.INT), ("sharpness", K.FLOAT), ("shift", K.FLOAT, 1.0),
    ("stage_2_steps", K.UINT, 10), ("stage_2_cfg", K.FLOAT, 1.0), ("stage_2_shift", K.FLOAT, 1.0),
    ("tiled_decoding", K.BOOL, False), ("decoding_tile_width", K.USHORT, 10), ("decoding_tile_height", K.USHORT, 10),
    ("decoding_tile_overlap", K.USHORT, 2), ("stochastic_sampling_gamma", K.FLOAT, 0.3),
    ("preserve_original_after_inpaint", K.BOOL, True), ("tiled_diffusion", K.BOOL, False),
    ("diffusion_tile_width", K.USHORT, 16), ("diffusion_tile_height", K.USHORT, 16),
    ("diffusion_tile_overlap", K.USHORT, 2), ("upscaler_scale_factor", K.UBYTE), ("t5_text_encoder", K.BOOL, True),
    ("separate_clip_l", K.BOOL, False), ("clip_l_text", K.STRING, ""), ("separate_open_clip_g", K.BOOL, False),
    ("open_clip_g_text", K.STRING, ""), ("speed_up_with_guidance_embed", K.BOOL, True),
    ("guidance_embed", K.FLOAT, 3.5), ("resolution_dependent_shift", K.BOOL, True), ("tea_cache_start", K.INT, 5),
    ("tea_cache_end", K.INT, -1), ("tea_cache_threshold", K.FLOAT, 0.06), ("tea_cache", K.BOOL, False),
    ("separate_t5", K.BOOL, False), ("t5_text", K.STRING, ""), ("tea_cache_max_skip_steps", K.INT, 3),
    ("causal_inference_enabled", K.BOOL, False), ("causal_inference", K.INT, 3), ("causal_inference_pad", K.INT),
    ("cfg_zero_star", K.BOOL, False), ("cfg_zero_init_steps", K.INT), ("compression_artifacts", K.BYTE),
    ("compression_artifacts_quality", K.FLOAT, 43.1), ("color_calibration", K.BYTE), ("expand_prompt_to_json", K.BOOL, False),
)
SLOTS: Mapping[str, Field] = {field.name: field for field in FIELDS}
_FILE = (Field("file", 0, K.STRING, ""),)
# The LoRA table; mode: 0 all models, 1 the base model, 2 the refiner.
LORA_FIELDS = (*_FILE, Field("weight", 1, K.FLOAT, 0.6), Field("mode", 2, K.BYTE))


def read_configuration(data: bytes) -> dict[str, Any]:
    """Every field of the configuration by name, defaults applied where the buffer omits one.

    Empty `data` is the all-defaults configuration. Raises InvalidRequest on a malformed buffer.
    """
    if len(data) > MAX_CONFIGURATION_BYTES:
        raise _malformed(f"is {len(data)} bytes; at most {MAX_CONFIGURATION_BYTES} are read")
    if not data:
        return {field.name: field.default for field in FIELDS}
    reader = _Reader(data)
    table = reader.table(reader.offset_at(0, "the root table"), "the root table")
    return {field.name: reader.field(table, field) for field in FIELDS}


def _malformed(why: str) -> InvalidRequest:
    return InvalidRequest("configuration", f"not a valid GenerationConfiguration FlatBuffer: it {why}")


class _Reader:
    """Bounds-checked access to a FlatBuffer from an untrusted source."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)  # flatbuffers' Table wants a mutable-indexable buffer

    def _need(self, position: int, size: int, what: str) -> None:
        if position < 0 or position + size > len(self.data):
            raise _malformed(f"points outside its {len(self.data)} bytes for {what}")

    def offset_at(self, position: int, what: str) -> int:
        """The position a uoffset stored at `position` refers to."""
        self._need(position, _UOFFSET, what)
        return position + N.UOffsetTFlags.py_type(int.from_bytes(self.data[position:position + _UOFFSET], "little"))

    def table(self, position: int, what: str) -> Table:
        self._need(position, 4, what)
        table = Table(self.data, position)
        vtable = position - int.from_bytes(self.data[position:position + 4], "little", signed=True)
        self._need(vtable, 4, f"the vtable of {what}")
        vtable_size = int.from_bytes(self.data[vtable:vtable + 2], "little")
        table_size = int.from_bytes(self.data[vtable + 2:vtable + 4], "little")
        if vtable_size < 4 or vtable_size % 2:
            raise _malformed(f"has a vtable of {vtable_size} bytes for {what}")
        self._need(vtable, vtable_size, f"the vtable of {what}")
        self._need(position, table_size, what)
        return table

    def field(self, table: Table, field: Field) -> Any:
        relative = table.Offset(4 + 2 * field.slot)
        if not relative:
            return field.default
        position = table.Pos + relative
        kind = field.kind
        if kind is Kind.STRING:
            return self.string(self.offset_at(position, field.name), field.name)
        if kind is Kind.FILES:
            return tuple(file for file, in self.entries(self.offset_at(position, field.name), field.name, _FILE))
        if kind is Kind.LORAS:
            return self.entries(self.offset_at(position, field.name), field.name, LORA_FIELDS)
        self._need(position, kind.value.bytewidth, field.name)
        return table.Get(kind.value, position)

    def string(self, position: int, what: str) -> str:
        length = self.vector_length(position, 1, what)
        if length > MAX_STRING_BYTES:
            raise _malformed(f"has a {length}-byte string for {what}; at most {MAX_STRING_BYTES} are read")
        start = position + _UOFFSET
        try:
            return bytes(self.data[start:start + length]).decode()
        except UnicodeDecodeError as exc:
            raise _malformed(f"has a string that is not UTF-8 for {what}") from exc

    def vector_length(self, position: int, item_size: int, what: str) -> int:
        self._need(position, _UOFFSET, what)
        length = int.from_bytes(self.data[position:position + _UOFFSET], "little")
        self._need(position + _UOFFSET, length * item_size, what)
        return length

    def entries(self, position: int, what: str, fields: tuple[Field, ...]) -> tuple[tuple[Any, ...], ...]:
        """The `fields` of each table of a vector of tables."""
        count = self.vector_length(position, _UOFFSET, what)
        if count > MAX_LIST_ITEMS:
            raise _malformed(f"lists {count} {what}; at most {MAX_LIST_ITEMS} are read")
        entries = []
        for i in range(count):
            item = f"{what}[{i}]"
            entry = self.table(self.offset_at(position + _UOFFSET * (1 + i), item), item)
            entries.append(tuple(self.field(entry, field) for field in fields))
        return tuple(entries)
