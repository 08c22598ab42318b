"""Finished images: PNG bytes that carry their generation parameters, A1111-style."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, PngImagePlugin


@dataclass(frozen=True)
class Parameters:
    """What it takes to reproduce one image, written as A1111's "parameters" text."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model_name: str
    model_hash: str
    # Hires fix: the first pass size and the second pass strength, when it ran.
    first_pass_size: tuple[int, int] | None = None
    denoising_strength: float | None = None
    upscaler: str | None = None
    face_restoration: str | None = None  # the restorer's name, when faces were restored
    clip_skip: int = 1
    upscaled_by: int | None = None  # the finished image's upscale factor (Real-ESRGAN), when it was upscaled
    refiner: str | None = None  # SDXL's refiner, "name [hash]" as A1111 writes it, and where it took over
    refiner_switch_at: float | None = None
    img2img: tuple[tuple[str, str], ...] = ()  # image to image's fields (mlx_sd.engine.img2img.parameters)
    # LoRAs: (name, A1111's short hash) of each, and the tags of those the prompt did not name
    lora_hashes: tuple[tuple[str, str], ...] = ()
    lora_tags: str = ""
    ti_hashes: tuple[tuple[str, str], ...] = ()  # (name, A1111's short hash) of each embedding used

    def text(self) -> str:
        fields = [
            ("Steps", self.steps),
            ("Sampler", self.sampler),
            ("CFG scale", _number(self.cfg_scale)),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
            ("Model hash", self.model_hash),
            ("Model", self.model_name),
        ]
        if self.clip_skip > 1:
            fields.append(("Clip skip", self.clip_skip))
        if self.face_restoration is not None:
            fields.append(("Face restoration", self.face_restoration))
        if self.first_pass_size is not None:
            w, h = self.first_pass_size
            fields += [
                ("Denoising strength", _number(self.denoising_strength or 0.0)),
                ("First pass size", f"{w}x{h}"),
                ("Hires resize", f"{self.width}x{self.height}"),
                ("Hires upscaler", self.upscaler or "Lanczos"),
            ]
        if self.refiner is not None:
            fields += [("Refiner", self.refiner), ("Refiner switch at", _number(self.refiner_switch_at or 0.0))]
        fields += self.img2img
        if self.upscaled_by is not None:  # A1111's names for its extras tab's upscaling
            fields += [("Postprocess upscale by", self.upscaled_by), ("Postprocess upscaler", "Real-ESRGAN")]
        for label, hashes in (("Lora hashes", self.lora_hashes), ("TI hashes", self.ti_hashes)):
            if hashes:
                fields.append((label, '"' + ", ".join(f"{n}: {h}" for n, h in hashes) + '"'))
        lines = [" ".join(filter(None, (self.prompt, self.lora_tags)))]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {v}" for k, v in fields))
        return "\n".join(lines)


def _number(x: float) -> str:
    return f"{x:g}"


def encode_png(pixels: np.ndarray, parameters: str) -> bytes:
    """PNG bytes of an HxWx3 uint8 image, with `parameters` in a tEXt chunk (A1111's key)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
