"""Photo files on disk: which suffixes count as images, and reading a folder of them."""

from __future__ import annotations

from pathlib import Path

# The documented upload formats (JPEG, PNG, WebP, BMP, GIF), by file name.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})


def image_files(folder: Path) -> list[Path]:
    """Every image file below ``folder``, in a stable (sorted) order."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def load_photos(folder: Path) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every image below ``folder``; none at all is an error."""
    files = image_files(folder)
    if not files:
        raise RuntimeError(f"no photos under {folder}")
    return [(p.name, p.read_bytes()) for p in files]
