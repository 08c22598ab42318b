"""The catalog of a model directory: which files are checkpoints of the families served, the restoration
weights, and its bounds."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from mlx_sd.engine import model_catalog
from mlx_sd.engine.model_catalog import CatalogEntry, catalog

TINY_DIFFUSERS = Path(__file__).parents[1] / "fixtures" / "sd1_tiny" / "diffusers"
UNET = "model.diffusion_model."


def fake_checkpoint(path: Path, *, in_channels: int = 4, linear_proj_in: bool = False,
                    text_encoders: tuple[str, ...] = ("cond_stage_model.transformer.",),
                    added_embedding: bool = False) -> Path:
    """A header with the keys and shapes the catalog reads (the tensors are tiny)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    proj_in = (8, 8) if linear_proj_in else (8, 8, 1, 1)
    tensors = {
        f"{UNET}input_blocks.0.0.weight": np.zeros((8, in_channels, 3, 3), np.float16),
        f"{UNET}middle_block.1.proj_in.weight": np.zeros(proj_in, np.float16),
        "first_stage_model.decoder.conv_out.weight": np.zeros((3, 8, 3, 3), np.float16),
    }
    tensors |= {f"{prefix}token_embedding.weight": np.zeros((4, 8), np.float16) for prefix in text_encoders}
    if added_embedding:
        tensors[f"{UNET}label_emb.0.0.weight"] = np.zeros((8, 8), np.float16)
    save_file(tensors, str(path))
    return path


def model(file: str, name: str) -> CatalogEntry:
    return CatalogEntry(file, name, "model", "v1")


def test_sd1_checkpoints_single_files_and_diffusers_folders(tmp_path: Path, sd1_single_file: Path) -> None:
    shutil.copy(sd1_single_file, tmp_path / "tiny.safetensors")
    shutil.copytree(TINY_DIFFUSERS, tmp_path / "stable-diffusion")
    fake_checkpoint(tmp_path / "sub" / "model.safetensors")
    assert catalog(tmp_path) == [
        model("stable-diffusion", "stable-diffusion"),
        model("sub/model.safetensors", "sub"),
        model("tiny.safetensors", "tiny"),
    ]


SDXL_ENCODERS = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")


@pytest.mark.parametrize(("kind", "version"), [
    ("SD 2", "v2"), ("SDXL", "sdxl_base_v0.9"), ("SD 1 with linear projections", "v1"),
])
def test_checkpoints_of_each_family_carry_its_draw_things_version(tmp_path: Path, kind: str, version: str) -> None:
    options = {
        "SD 2": {"text_encoders": ("cond_stage_model.model.",), "linear_proj_in": True},
        "SDXL": {"text_encoders": SDXL_ENCODERS, "linear_proj_in": True, "added_embedding": True},
        "SD 1 with linear projections": {"linear_proj_in": True},
    }[kind]
    fake_checkpoint(tmp_path / "model.safetensors", **options)
    assert catalog(tmp_path) == [CatalogEntry("model.safetensors", "model", "model", version)]


@pytest.mark.parametrize("kind", ["SDXL refiner", "mixed families", "inpainting"])
def test_checkpoints_not_served_as_a_base_model_are_left_out(tmp_path: Path, kind: str) -> None:
    options = {
        "SDXL refiner": {"text_encoders": ("conditioner.embedders.0.model.",), "added_embedding": True},
        "mixed families": {"text_encoders": SDXL_ENCODERS},  # SDXL's encoders, no added embedding
        "inpainting": {"in_channels": 9},
    }[kind]
    fake_checkpoint(tmp_path / "other.safetensors", **options)
    assert catalog(tmp_path) == []


def test_other_files_are_left_out(tmp_path: Path) -> None:
    save_file({"decoder.conv_out.weight": np.zeros((3, 8, 3, 3), np.float16)}, str(tmp_path / "vae.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 64)
    (tmp_path / "draw_things.ckpt").write_bytes(b"SQLite format 3\x00" + bytes(100))
    (tmp_path / "notes.txt").write_text("hello")
    fake_checkpoint(tmp_path / ".hidden.safetensors")
    fake_checkpoint(tmp_path / ".cache" / "model.safetensors")
    fake_checkpoint(tmp_path / ".mlx-sd-upload-abc.part")
    assert catalog(tmp_path) == []


def test_restoration_weights_are_listed_when_usable(tmp_path: Path) -> None:
    fake_checkpoint(tmp_path / "upscaler" / "model.safetensors")  # never mistaken for an SD model
    (tmp_path / "face_restoration").mkdir()
    (tmp_path / "face_restoration" / "gfpgan.safetensors").write_bytes(b"x")
    assert catalog(tmp_path) == [CatalogEntry("upscaler/model.safetensors", "Real-ESRGAN", "upscaler", "")]
    (tmp_path / "face_restoration" / "detection.safetensors").write_bytes(b"x")  # the restorer needs both
    assert catalog(tmp_path)[-1] == CatalogEntry("face_restoration/gfpgan.safetensors", "GFPGAN", "face_restorer", "")


def test_symlinks_are_not_followed_out_of_the_directory(tmp_path: Path) -> None:
    root, outside = tmp_path / "models", tmp_path / "outside"
    fake_checkpoint(outside / "secret.safetensors")
    fake_checkpoint(root / "real.safetensors")
    (root / "linked_file.safetensors").symlink_to(outside / "secret.safetensors")
    (root / "linked_folder").symlink_to(outside, target_is_directory=True)
    (root / "alias.safetensors").symlink_to(root / "real.safetensors")  # stays inside: listed
    shutil.copytree(TINY_DIFFUSERS, outside / "diffusers")
    (root / "half_linked" / "text_encoder").mkdir(parents=True)
    (root / "half_linked" / "unet").symlink_to(outside / "diffusers" / "unet", target_is_directory=True)
    assert [entry.file for entry in catalog(root)] == ["alias.safetensors", "real.safetensors"]


def test_folders_deeper_than_the_limit_are_not_scanned(tmp_path: Path) -> None:
    deep = Path(*["d"] * model_catalog.MAX_DEPTH)
    fake_checkpoint(tmp_path / deep / "ok.safetensors")
    fake_checkpoint(tmp_path / deep / "d" / "too_deep.safetensors")
    assert [entry.file for entry in catalog(tmp_path)] == [(deep / "ok.safetensors").as_posix()]


def test_the_number_of_entries_and_headers_is_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(6):
        fake_checkpoint(tmp_path / f"m{i}.safetensors")
    monkeypatch.setattr(model_catalog, "MAX_HEADERS", 3)
    assert len(catalog(tmp_path)) == 3
    monkeypatch.setattr(model_catalog, "MAX_HEADERS", 100)
    monkeypatch.setattr(model_catalog, "MAX_ENTRIES", 5)
    assert len(catalog(tmp_path)) == 4  # the folder itself and four files
