"""Stand-ins for image processors that need torchvision (not importable beside the CPU build
of torch here): they emit the processors' fields and layout, not their resized pixel values."""

from __future__ import annotations

from typing import Any


def _rgb_values(image: Any) -> Any:
    """``[H * W, 3]`` float32 pixel values of a PIL image in RGB, row by row (what
    ``list(image.getdata())`` gave, without the per-pixel Python tuples Pillow 14 drops)."""
    import torch

    raw = bytearray(image.convert("RGB").tobytes())
    return torch.frombuffer(raw, dtype=torch.uint8).to(torch.float32).view(-1, 3)


class FlatPatchLayout:
    """Stand-in for an image processor that needs torchvision (Kimi-K2.5's): images become
    exactly its output layout, ``pixel_values [sum(h*w), C, patch, patch]`` (each image cut into
    patch x patch tiles, row by row, scaled to [-1, 1]) and ``image_grid_thw`` rows
    ``[1, h, w]`` in patches. Values differ from the real processor's resizing; the layout, which
    is what pipelining depends on, does not."""

    def __init__(self, patch_size: int) -> None:
        self.patch_size = patch_size

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, Any]:
        import torch

        patch = self.patch_size
        pixels, grids = [], []
        for image in images:
            array = _rgb_values(image)
            height, width = image.height // patch * patch, image.width // patch * patch
            array = array.view(image.height, image.width, 3)[:height, :width] / 127.5 - 1
            tiles = array.view(height // patch, patch, width // patch, patch, 3)
            pixels.append(tiles.permute(0, 2, 4, 1, 3).reshape(-1, 3, patch, patch))
            grids.append([1, height // patch, width // patch])
        return {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(grids)}


class Step3Layout:
    """Stand-in for Step3p7's image processor (it needs torchvision): each image becomes one
    ``[C, S, S]`` global view, plus one ``[C, S/2, S/2]`` local crop for images that are not
    square, with the processor's field names (``pixel_values``, ``pixel_values_local``,
    ``num_local_patches``, ``patch_newline_masks``). Only the layout is the processor's."""

    def __init__(self, size: int) -> None:
        self.size = size

    def _tensor(self, image: Any, size: int) -> Any:

        resized = image.convert("RGB").resize((size, size))
        pixels = _rgb_values(resized) / 127.5 - 1
        return pixels.view(size, size, 3).permute(2, 0, 1)

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, Any]:
        import torch

        images = [
            item for entry in images for item in (entry if isinstance(entry, list) else [entry])
        ]
        views = [self._tensor(image, self.size) for image in images]
        crops = [
            self._tensor(image, self.size // 2) for image in images if image.width != image.height
        ]
        local = [int(image.width != image.height) for image in images]
        return {
            "pixel_values": torch.stack(views),
            "pixel_values_local": torch.stack(crops)
            if crops
            else torch.zeros(0, 3, self.size // 2, self.size // 2),
            "num_local_patches": torch.tensor(local),
            "patch_newline_masks": torch.zeros(len(crops), dtype=torch.bool),
        }


#: ``OPENAI_CLIP_MEAN`` / ``OPENAI_CLIP_STD``, the Inkling image processor's normalisation.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class InklingPatchLayout:
    """Stand-in for Inkling's image processor (it needs torchvision), following its steps:
    each image scaled by ``rescale_image_frac`` (long edge, half-up rounding), cut into
    ``ceil(H / p)`` rows of ``W // p + 1`` patches (its rule: one more column than fits),
    each patch padded bottom-right to ``p x p`` with -1 before rescaling and normalising,
    repeated over 2 frames: ``pixel_values [patches, 2, p, p, 3]`` flat over the batch and
    ``num_patches`` per image. The resize is PIL's, so values differ slightly from
    torchvision's; the layout does not."""

    def __init__(self, patch_size: int, rescale_image_frac: float | None = None) -> None:
        self.patch_size = patch_size
        self.rescale_image_frac = rescale_image_frac

    def _resized(self, image: Any) -> Any:
        if self.rescale_image_frac is None:
            return image.convert("RGB")
        from PIL import Image

        ratio = self.rescale_image_frac  # the long edge scaled by it: the same ratio for both
        size = (int(image.width * ratio + 0.5), int(image.height * ratio + 0.5))
        return image.convert("RGB").resize(size, Image.Resampling.LANCZOS)

    def _patches(self, image: Any) -> Any:
        import torch

        patch = self.patch_size
        pixels = _rgb_values(image).view(image.height, image.width, 3).permute(2, 0, 1)
        rows, cols = -(-image.height // patch), image.width // patch + 1
        out = torch.full((rows * cols, 3, patch, patch), -1.0)
        for i in range(rows):
            for j in range(cols):
                piece = pixels[:, i * patch : (i + 1) * patch, j * patch : (j + 1) * patch]
                out[i * cols + j, :, : piece.shape[1], : piece.shape[2]] = piece
        mean = torch.tensor(_CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(_CLIP_STD).view(1, 3, 1, 1)
        return (out / 255 - mean) / std

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, Any]:
        import torch

        per_image = [self._patches(self._resized(image)) for image in images]
        pixels = torch.cat(per_image).unsqueeze(-1).repeat(1, 1, 1, 1, 2)
        return {
            "pixel_values": pixels.permute(0, 4, 2, 3, 1).contiguous(),
            "num_patches": torch.tensor([len(patches) for patches in per_image]),
        }


class MergedPatchLayout:
    """Stand-in for a Qwen-VL-style image processor that needs torchvision (MiniMax-M3-VL's):
    ``pixel_values [sum(h*w), C * temporal_patch * patch**2]`` (each image repeated over the
    temporal patch, patches ordered merge window by merge window, row by row, scaled to
    [-1, 1]) and ``image_grid_thw`` rows ``[1, h, w]`` in patches. Images are cropped to a
    whole number of merge windows instead of resized: only the layout is the processor's."""

    def __init__(self, patch_size: int, merge_size: int, temporal_patch_size: int) -> None:
        self.patch_size = patch_size
        self.merge_size = merge_size
        self.temporal_patch_size = temporal_patch_size

    def _patches(self, image: Any) -> tuple[Any, list[int]]:
        patch, merge = self.patch_size, self.merge_size
        window = patch * merge
        height, width = image.height // window * window, image.width // window * window
        array = _rgb_values(image).view(image.height, image.width, 3)[:height, :width] / 127.5 - 1
        rows, cols = height // patch, width // patch
        # [C, rows/m, m, p, cols/m, m, p] -> [rows/m, cols/m, m, m, C, p, p]
        tiles = array.permute(2, 0, 1).reshape(
            3, rows // merge, merge, patch, cols // merge, merge, patch
        )
        tiles = tiles.permute(1, 4, 2, 5, 0, 3, 6).unsqueeze(5)
        frames = tiles.expand(-1, -1, -1, -1, -1, self.temporal_patch_size, -1, -1)
        return frames.reshape(rows * cols, -1), [1, rows, cols]

    def __call__(self, images: list[Any], return_tensors: str = "pt") -> dict[str, Any]:
        import torch

        pixels, grids = zip(*(self._patches(image) for image in images), strict=True)
        return {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor(grids)}
