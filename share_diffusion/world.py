"""The procedural world: captioned scenes of shapes, and styles that render a scene.

The embedded base model is pretrained on plain scenes (`sample_scene` + `render`). The styles in
`STYLES` are kept out of the UNet's pretraining, so that learning one is a real test; the VAE sees
all of them except `VAE_HELD_OUT_STYLE`, plus generic textures and graphic primitives drawn over
images, so it can represent styles it was never taught (`vae_training_image`).

Everything is deterministic given a `numpy.random.Generator`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 64
SUPERSAMPLE = 2

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "pink": (240, 130, 180),
    "cyan": (40, 200, 210),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
POSITIONS: dict[str, tuple[float, float]] = {
    "in the center": (0.5, 0.5),
    "on the left": (0.3, 0.5),
    "on the right": (0.7, 0.5),
    "at the top": (0.5, 0.3),
    "at the bottom": (0.5, 0.7),
}


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str
    size: float  # radius as a fraction of the image side
    jitter: tuple[float, float]  # centre offset as a fraction of the image side

    def caption(self, with_position: bool = True) -> str:
        text = f"a {self.colour} {self.shape} on a {self.background} background"
        return f"{text}, {self.position}" if with_position else text


def sample_scene(rng: np.random.Generator) -> Scene:
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    return Scene(
        shape=str(rng.choice(SHAPES)),
        colour=str(colour),
        background=str(background),
        position=str(rng.choice(list(POSITIONS))),
        size=float(rng.uniform(0.14, 0.22)),
        jitter=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
    )


def parse_caption(caption: str) -> Scene:
    """Inverse of `Scene.caption` for the words the world knows (used to score generations)."""
    words = caption.lower().replace(",", " ").split()
    colours = [w for w in words if w in COLOURS]
    shape = next(w for w in words if w in SHAPES)
    position = next((p for p in POSITIONS if p in caption), "in the center")
    return Scene(shape, colours[0], colours[1], position, 0.18, (0.0, 0.0))


def shape_mask(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask of the scene's shape, antialiased by supersampling (returned as float in [0,1])."""
    n = size * SUPERSAMPLE
    cx, cy = POSITIONS[scene.position]
    cx, cy = cx + scene.jitter[0], cy + scene.jitter[1]
    y, x = (np.mgrid[0:n, 0:n] + 0.5) / n
    dx, dy, r = x - cx, y - cy, scene.size
    if scene.shape == "circle":
        mask = dx**2 + dy**2 <= r**2
    elif scene.shape == "square":
        mask = (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    elif scene.shape == "diamond":
        mask = np.abs(dx) + np.abs(dy) <= 1.2 * r
    elif scene.shape == "cross":
        arm = 0.38 * r
        mask = ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    elif scene.shape == "triangle":
        top, bottom = cy - r, cy + 0.8 * r
        half_width = (y - top) / (bottom - top) * r * 1.1
        mask = (y >= top) & (y <= bottom) & (np.abs(dx) <= half_width)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The plain scene as float RGB in [0, 1], shape (size, size, 3)."""
    alpha = shape_mask(scene, size)[..., None]
    fg = np.array(COLOURS[scene.colour], dtype=np.float32) / 255
    bg = np.array(COLOURS[scene.background], dtype=np.float32) / 255
    return (alpha * fg + (1 - alpha) * bg).astype(np.float32)


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8))


# --- reading a generated image back -----------------------------------------------------------


def nearest_colour(rgb: np.ndarray) -> str:
    palette = np.array(list(COLOURS.values()), dtype=np.float32) / 255
    return list(COLOURS)[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str
    shape: str
    shape_fraction: float  # share of the image the shape covers


def read_scene(image: np.ndarray) -> Reading:
    """What a plain-world image shows: background colour (from the border), the shape's colour
    (pixels unlike the background) and its shape (best IoU among the world's shapes, fitted at the
    shape's centroid with the same area)."""
    image = np.asarray(image, dtype=np.float32)
    if image.max() > 1.5:
        image = image / 255
    border = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3), image[:, :3].reshape(-1, 3), image[:, -3:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    mask = np.sqrt(((image - background) ** 2).sum(axis=-1)) > 0.25
    fraction = float(mask.mean())
    if mask.sum() < 8:
        return Reading(nearest_colour(background), "none", "none", fraction)
    colour = nearest_colour(np.median(image[mask], axis=0))
    size = image.shape[0]
    ys, xs = np.nonzero(mask)
    centre = ((xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size)
    best, best_iou = "none", -1.0
    for shape in SHAPES:
        for radius in np.linspace(0.06, 0.35, 30):
            template = shape_mask(Scene(shape, "white", "black", "in the center", float(radius), (0.0, 0.0)), size) > 0.5
            if template.sum() >= mask.sum():
                break
        ty, tx = np.nonzero(template)
        offset = (round(centre[1] * size - 0.5 - ty.mean()), round(centre[0] * size - 0.5 - tx.mean()))
        template = np.roll(template, offset, axis=(0, 1))
        iou = (template & mask).sum() / max((template | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return Reading(nearest_colour(background), colour, best, fraction)


# --- styles -------------------------------------------------------------------------------------
# Each style renders a scene in that style: (scene, rng) -> float RGB in [0, 1].


def _luminance(image: np.ndarray) -> np.ndarray:
    return image @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _grid(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    return y, x


def _distance_inside(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """Each pixel's distance in from the nearest side of a rectangle (negative outside it)."""
    y, x = _grid()
    return np.minimum(np.minimum(y - top, x - left), np.minimum(bottom - y, right - x))


def _edge(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels within `width` of the shape's boundary."""
    inside = mask > 0.5
    grown, shrunk = inside.copy(), inside.copy()
    for _ in range(width):
        grown = _dilate(grown)
        shrunk = ~_dilate(~shrunk)
    return grown & ~shrunk


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def style_sepia(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    lum = _luminance(render(scene))[..., None]
    tone = np.array([1.0, 0.78, 0.52], dtype=np.float32)
    return np.clip(0.12 + 0.85 * lum * tone + 0.05 * tone, 0, 1)


def style_neon(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    mask = shape_mask(scene)
    glow = _edge(mask, 2).astype(np.float32)
    colour = np.array(COLOURS[scene.colour], dtype=np.float32) / 255
    if colour.max() < 0.5:  # black and gray shapes glow white
        colour = np.ones(3, dtype=np.float32)
    colour = colour / colour.max()
    image = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 0.03, dtype=np.float32)
    return np.clip(image + glow[..., None] * colour + 0.15 * mask[..., None] * colour, 0, 1)


def style_hatching(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    lines = ((x + y + rng.integers(0, 6)) % 6) < 2
    return render(scene) * np.where(lines, 0.35, 1.0)[..., None].astype(np.float32)


def style_pointillism(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    image = render(scene)
    canvas = np.full_like(image, 0.96)
    y, x = _grid()
    for cy in range(2, IMAGE_SIZE, 4):
        for cx in range(2, IMAGE_SIZE, 4):
            jy, jx = cy + rng.uniform(-0.8, 0.8), cx + rng.uniform(-0.8, 0.8)
            dot = (y - jy) ** 2 + (x - jx) ** 2 <= 2.3
            canvas[dot] = image[min(int(jy), IMAGE_SIZE - 1), min(int(jx), IMAGE_SIZE - 1)]
    return canvas


def style_mosaic(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    block = 8
    image = render(scene)
    tiles = image.reshape(IMAGE_SIZE // block, block, IMAGE_SIZE // block, block, 3).mean(axis=(1, 3))
    image = np.repeat(np.repeat(tiles, block, axis=0), block, axis=1)
    y, x = _grid()
    grout = (y % block == 0) | (x % block == 0)
    image[grout] = 0.15
    return image


def style_outline(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    image = np.round(render(scene) * 3) / 3  # posterised, like a cartoon
    image[_edge(shape_mask(scene), 2)] = 0.02
    return image


def style_halftone(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    darkness = 1 - _luminance(render(scene))
    canvas = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), [0.97, 0.95, 0.88], dtype=np.float32)
    y, x = _grid()
    spacing = 6
    cell_y, cell_x = (y // spacing) * spacing + spacing / 2, (x // spacing) * spacing + spacing / 2
    radius = 0.6 + 2.6 * darkness[cell_y.astype(int), cell_x.astype(int)]
    canvas[(y - cell_y) ** 2 + (x - cell_x) ** 2 <= radius**2] = 0.08
    return canvas


def style_invert(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    return 1 - render(scene)


def style_checker(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    image = render(scene)
    y, x = _grid()
    checks = ((y // 8 + x // 8) % 2 == 0)[..., None]
    alpha = shape_mask(scene)[..., None]
    background = np.where(checks, image, 0.55 * image + 0.45 * (1 - image))
    return alpha * image + (1 - alpha) * background


def style_frame(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    image = render(scene)
    border = _distance_inside(0, 0, IMAGE_SIZE - 1, IMAGE_SIZE - 1)
    image[border < 6] = 0.98
    image[border == 5] = 0.45
    return image


STYLES = {
    "sepia": style_sepia,
    "neon": style_neon,
    "hatching": style_hatching,
    "pointillism": style_pointillism,
    "mosaic": style_mosaic,
    "outline": style_outline,
    "halftone": style_halftone,
    "invert": style_invert,
    "checker": style_checker,
    "frame": style_frame,
}
VAE_HELD_OUT_STYLE = "frame"


# Colour and tone styles that neither the embedded model's UNet nor its VAE ever saw, and that tuned
# nothing: benchmarks report on them. Kept out of STYLES, which the pretraining data is drawn from.
def style_cyanotype(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    lum = _luminance(render(scene))[..., None]
    return (0.08 + 0.9 * lum) * np.array([0.55, 0.75, 1.0], dtype=np.float32) * np.where(lum > 0.5, 1.0, 0.55)


def style_vignette(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    distance = np.hypot(y - IMAGE_SIZE / 2, x - IMAGE_SIZE / 2) / (IMAGE_SIZE / 2)
    return render(scene) * np.clip(1.25 - 0.95 * distance**2, 0.05, 1)[..., None]


def style_duotone(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    lum = _luminance(render(scene))[..., None]
    dark, light = np.array([0.35, 0.05, 0.4], dtype=np.float32), np.array([1.0, 0.8, 0.3], dtype=np.float32)
    return dark + lum * (light - dark)


UNSEEN_STYLES = {"cyanotype": style_cyanotype, "vignette": style_vignette, "duotone": style_duotone}


def render_styled(style: str, scene: Scene, rng: np.random.Generator) -> np.ndarray:
    return {**STYLES, **UNSEEN_STYLES}[style](scene, rng).astype(np.float32)


# --- generic textures, so the VAE learns to represent what the UNet has never seen ----------------


def random_texture(rng: np.random.Generator) -> np.ndarray:
    y, x = _grid()
    colours = rng.uniform(0, 1, size=(2, 3)).astype(np.float32)
    if rng.random() < 0.3:  # include pure white, black and greys
        colours[rng.integers(0, 2)] = rng.choice([0.0, 0.5, 1.0, rng.uniform()])
    kind = rng.integers(0, 7)
    if kind == 0:  # stripes at any angle and period, down to 1-pixel scanlines
        angle, period = rng.uniform(0, np.pi), rng.choice([2, 3, 4, 6, 8, 12])
        pattern = ((x * np.cos(angle) + y * np.sin(angle)) % period) < period / 2
    elif kind == 1:  # dots
        spacing = rng.choice([4, 6, 8])
        radius = rng.uniform(0.8, spacing / 2)
        pattern = ((y % spacing - spacing / 2) ** 2 + (x % spacing - spacing / 2) ** 2) <= radius**2
    elif kind == 2:  # checkers
        cell = rng.choice([2, 4, 8, 16])
        pattern = (y // cell + x // cell) % 2 == 0
    elif kind == 3:  # gradient
        t = (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)) / IMAGE_SIZE
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
        return (t[..., None] * colours[0] + (1 - t[..., None]) * colours[1]).astype(np.float32)
    elif kind == 4:  # borders and frames
        width = rng.integers(1, 10)
        pattern = _distance_inside(0, 0, IMAGE_SIZE - 1, IMAGE_SIZE - 1) < width
    elif kind == 5:  # bands of any width, down to 1-pixel rules, as in plaids, barcodes and mats
        band_edges = np.cumsum(rng.choice([1, 1, 2, 3, 4, 6, 8, 12], size=IMAGE_SIZE))
        band = np.searchsorted(band_edges, y if rng.random() < 0.5 else x, side="right")
        palette = np.stack([_random_colour(rng) for _ in range(IMAGE_SIZE)])
        return palette[band]
    else:  # random rectangles
        pattern = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
        for _ in range(rng.integers(1, 6)):
            y0, x0 = rng.integers(0, IMAGE_SIZE, size=2)
            h, w = rng.integers(2, 30, size=2)
            pattern[y0 : y0 + h, x0 : x0 + w] ^= True
    return np.where(pattern[..., None], colours[0], colours[1]).astype(np.float32)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.4:  # white, black and greys are common in graphics
        return np.full(3, rng.choice([0.0, 0.02, 0.45, 0.5, 0.98, 1.0, rng.uniform()]), dtype=np.float32)
    return rng.uniform(0, 1, size=3).astype(np.float32)


def overlay_graphics(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw 1-3 graphic primitives over an image: rectangle outlines (often centred, like borders
    and mats), straight lines, and filled rectangles, each in any colour and 1 to 8 pixels wide."""
    image = image.copy()
    y, x = _grid()
    for _ in range(rng.integers(1, 4)):
        kind = rng.integers(0, 3)
        if kind == 0:
            if rng.random() < 0.6:  # centred on the image
                top = left = rng.integers(0, 17)
                bottom = right = IMAGE_SIZE - 1 - top
            else:
                top, left = rng.integers(0, IMAGE_SIZE - 8, size=2)
                bottom, right = top + rng.integers(6, IMAGE_SIZE - top), left + rng.integers(6, IMAGE_SIZE - left)
            distance = _distance_inside(top, left, bottom, right)
            mask = (distance >= 0) & (distance < rng.integers(1, 9))
        elif kind == 1:
            angle = rng.choice([0, np.pi / 2]) if rng.random() < 0.5 else rng.uniform(0, np.pi)  # rules are often straight
            offset = (x - rng.uniform(0, IMAGE_SIZE)) * np.sin(angle) - (y - rng.uniform(0, IMAGE_SIZE)) * np.cos(angle)
            mask = np.abs(offset) < rng.integers(1, 4) / 2
        else:
            y0, x0 = rng.integers(0, IMAGE_SIZE, size=2)
            mask = (y >= y0) & (y < y0 + rng.integers(2, 30)) & (x >= x0) & (x < x0 + rng.integers(2, 30))
        image[mask] = _random_colour(rng)
    return image


def vae_training_image(rng: np.random.Generator) -> np.ndarray:
    """A broad mix: plain scenes, styled scenes (all but the held-out style) and textures, with
    graphic primitives drawn over some of them."""
    choice = rng.random()
    if choice < 0.3:
        image = render(sample_scene(rng))
    elif choice < 0.65:
        styles = [name for name in STYLES if name != VAE_HELD_OUT_STYLE]
        image = render_styled(str(rng.choice(styles)), sample_scene(rng), rng)
    else:
        image = random_texture(rng)
        if rng.random() < 0.4:  # a shape over the texture
            scene = sample_scene(rng)
            alpha = shape_mask(scene)[..., None]
            image = alpha * np.array(COLOURS[scene.colour], dtype=np.float32) / 255 + (1 - alpha) * image
    if rng.random() < 0.4:
        image = overlay_graphics(image, rng)
    return image.astype(np.float32)


def style_images(style: str, count: int, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """`count` images of a style with their plain scene captions, e.g. for a demo training set."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        scene = sample_scene(rng)
        out.append((to_pil(render_styled(style, scene, rng)), scene.caption()))
    return out


EXAMPLE_STYLES = ("hatching", "neon", "mosaic", "halftone")


def write_examples(directory: Path, styles=EXAMPLE_STYLES, count: int = 12, seed: int = 1000) -> None:
    """Demo training sets: `<directory>/<style>/NN.png` with kohya-style `NN.txt` captions."""
    for n, style in enumerate(styles):
        folder = directory / style
        folder.mkdir(parents=True, exist_ok=True)
        for i, (image, caption) in enumerate(style_images(style, count, seed=seed + n)):
            image.save(folder / f"{i:02d}.png")
            (folder / f"{i:02d}.txt").write_text(caption + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the demo style image sets.")
    parser.add_argument("command", choices=["examples"])
    parser.add_argument("--out", type=Path, default=Path("styles/examples"))
    args = parser.parse_args()
    write_examples(args.out)
