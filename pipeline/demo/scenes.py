"""Procedural spatial-VQA scenes: the project's built-in dataset.

Scenes are shapes in distinct colours and two sizes on a plain background; small objects sit
near the corners and edges, so answers depend on image tokens all over the 24x24 grid, which is
what aggressive visual-token pruning endangers. Everything is derived from a seed, so the same
seed gives the same scenes, questions and PNG bytes on any machine.

CLI: ``python -m pipeline.demo.scenes --seed 1 --n 1000 --out DIR [--format parquet|hf]``.
"""

from __future__ import annotations

import argparse
import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24

SHAPE_NAMES = ("circle", "square", "triangle", "cross")
# Canonical colour order: captions list objects in this order.
COLORS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 30),
    "green": (30, 160, 60),
    "blue": (30, 80, 225),
    "purple": (140, 50, 190),
}
COLOR_NAMES = tuple(COLORS)
SIZES = ("small", "large")
BACKGROUNDS = ((255, 255, 255), (205, 205, 205), (240, 230, 205), (70, 70, 70))
# Objects sit on the patch grid: a small one inside one 14 px patch, a large one centred on a
# grid corner so that it covers 2x2 patches. Every patch an object touches then shows a
# distinctive piece of its outline (the whole shape, or one quadrant of it), which a small
# vision tower learns within minutes. An object spanning 7x7 patches would leave interior
# patches whose shape only attention over the whole object reveals, which it does not learn.
RADIUS = {"small": (6, 6), "large": (10, 12)}  # half-extent in pixels, per size
JITTER = 1  # pixels off the grid
EDGE_BAND = 56  # small objects have their centre within this many pixels of an edge
QUESTION_TYPES = ("exists", "color", "shape", "size", "caption")


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cx: int
    cy: int
    r: int


@dataclass(frozen=True)
class Scene:
    background: tuple[int, int, int]
    objects: tuple[Obj, ...]

    def with_shape(self, shape: str) -> list[Obj]:
        return [o for o in self.objects if o.shape == shape]


def _cells(cx: int, cy: int, r: int) -> set[tuple[int, int]]:
    """Grid cells (row, col) of the box [c - r, c + r) around the centre: what the object covers
    (a small object drawn one pixel off-centre may overhang its patch by one pixel column)."""
    return {(y // PATCH, x // PATCH) for y in (cy - r, cy + r - 1) for x in (cx - r, cx + r - 1)}


def sample_scene(rng: random.Random, max_objects: int = 5) -> Scene:
    """1..max_objects objects, each colour at most once (so "the red object" is unique), no
    two objects in the same patch."""
    n = rng.randint(1, max_objects)
    colors = rng.sample(COLOR_NAMES, n)
    placed: list[Obj] = []
    taken: set[tuple[int, int]] = set()
    band = EDGE_BAND // PATCH  # cells
    for color in colors:
        for _ in range(200):  # rejection sampling; always succeeds in practice for n <= 6
            size = rng.choice(SIZES)
            r = rng.randint(*RADIUS[size])
            if size == "small":  # centre of a patch in the band along an edge (corners included)
                along, across = rng.randrange(GRID), rng.randrange(band)
                if rng.random() < 0.5:
                    across = GRID - 1 - across
                col, row = (along, across) if rng.random() < 0.5 else (across, along)
                cx, cy = col * PATCH + PATCH // 2, row * PATCH + PATCH // 2
            else:  # on a grid corner, anywhere
                cx, cy = rng.randint(1, GRID - 1) * PATCH, rng.randint(1, GRID - 1) * PATCH
            cx += rng.randint(-JITTER, JITTER)
            cy += rng.randint(-JITTER, JITTER)
            cells = _cells(cx, cy, r)
            if not cells & taken:
                placed.append(Obj(rng.choice(SHAPE_NAMES), color, size, cx, cy, r))
                taken |= cells
                break
    return Scene(rng.choice(BACKGROUNDS), tuple(placed))


def _draw(draw: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    x, y, r = o.cx, o.cy, o.r
    if o.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif o.shape == "square":
        s = round(r * 0.85)  # same visual area as the circle, roughly
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([(x, y - r), (x - r, y + round(0.8 * r)), (x + r, y + round(0.8 * r))], fill=fill)
    elif o.shape == "cross":
        t = max(2, round(r * 0.3))
        draw.rectangle((x - r, y - t, x + r, y + t), fill=fill)
        draw.rectangle((x - t, y - r, x + t, y + r), fill=fill)
    else:
        raise ValueError(o.shape)


def render(scene: Scene) -> Image.Image:
    """Aliased drawing: few distinct colours, so PNGs stay small."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), scene.background)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, COLORS[o.color])
    return img


def patch_labels(scene: Scene) -> np.ndarray:
    """Per-patch object index (-1 = background), [GRID, GRID].

    Used as dense supervision for the vision tower in training; patches an object covers
    less than 5 % of are labelled background.
    """
    mask = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for i, o in enumerate(scene.objects):
        _draw(draw, o, i + 1)
    m = np.asarray(mask).reshape(GRID, PATCH, GRID, PATCH).transpose(0, 2, 1, 3).reshape(GRID, GRID, -1)
    out = np.full((GRID, GRID), -1, dtype=np.int64)
    for i in range(len(scene.objects)):
        out[(m == i + 1).mean(-1) >= 0.05] = i
    return out


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def caption(scene: Scene) -> str:
    objs = sorted(scene.objects, key=lambda o: COLOR_NAMES.index(o.color))
    return ", ".join(f"{o.color} {o.shape}" for o in objs)


def questions(scene: Scene, rng: random.Random, qtype: str) -> tuple[str, str] | None:
    """One (question, answer) of the given type, or None where the type has no valid question."""
    objs = scene.objects
    if qtype == "exists":
        if rng.random() < 0.5:
            o = rng.choice(objs)
            return f"is there a {o.color} {o.shape}?", "yes"
        present = {(o.color, o.shape) for o in objs}
        # Hard negatives: share the colour or the shape with an object that is there.
        o = rng.choice(objs)
        cands = [(o.color, s) for s in SHAPE_NAMES] + [(c, o.shape) for c in COLOR_NAMES]
        if rng.random() < 0.3:
            cands = [(c, s) for c in COLOR_NAMES for s in SHAPE_NAMES]
        cands = [p for p in cands if p not in present]
        c, s = rng.choice(cands)
        return f"is there a {c} {s}?", "no"
    if qtype == "color":
        unique = [o for o in objs if len(scene.with_shape(o.shape)) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return f"what color is the {o.shape}?", o.color
    if qtype == "shape":
        o = rng.choice(objs)
        return f"what shape is the {o.color} object?", o.shape
    if qtype == "size":
        o = rng.choice(objs)
        return f"what size is the {o.color} {o.shape}?", o.size
    if qtype == "caption":
        return "list the objects.", caption(scene)
    raise ValueError(qtype)


def vocabulary() -> list[str]:
    """Every word the questions and answers can contain (the demo tokenizer's vocabulary)."""
    words = set(SHAPE_NAMES) | set(COLOR_NAMES) | set(SIZES) | {"yes", "no"}
    words |= set("is there a what color shape size the object list objects".split())
    return sorted(words) + ["?", ".", ","]


def samples(seed: int, n: int, types: tuple[str, ...] = QUESTION_TYPES, max_objects: int = 5):
    """Yield n (scene, question_type, question, answer), one question per scene, types cycling."""
    rng = random.Random(seed)
    for i in range(n):
        scene = sample_scene(rng, max_objects)
        for k in range(len(types)):  # fall through to the next type where one has no question
            qtype = types[(i + k) % len(types)]
            if (qa := questions(scene, rng, qtype)) is not None:
                break
        yield scene, qtype, *qa


def generate(seed: int, n: int, types: tuple[str, ...] = QUESTION_TYPES, max_objects: int = 5) -> list[dict]:
    """n dataset rows: id, image (PNG bytes), question, answer_gt, question_type."""
    return [
        {
            "id": f"demo-{seed}-{i:05d}",
            "image": png_bytes(render(scene)),
            "question": q,
            "answer_gt": a,
            "question_type": qtype,
        }
        for i, (scene, qtype, q, a) in enumerate(samples(seed, n, types, max_objects))
    ]


def write(rows: list[dict], out: str | Path, fmt: str = "parquet") -> Path:
    """Write rows as one Parquet file (``out`` is the file) or a HF dataset dir (``save_to_disk``)."""
    out = Path(out)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), out, compression="zstd")
    elif fmt == "hf":
        import datasets

        features = datasets.Features({
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answer_gt": datasets.Value("string"),
            "question_type": datasets.Value("string"),
        })
        rows_hf = [{**r, "image": {"bytes": r["image"], "path": None}} for r in rows]
        datasets.Dataset.from_list(rows_hf, features=features).save_to_disk(str(out))
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--out", required=True, help="Parquet file path, or directory for --format hf")
    p.add_argument("--format", choices=("parquet", "hf"), default="parquet")
    a = p.parse_args()
    print(write(generate(a.seed, a.n), a.out, a.format))


if __name__ == "__main__":
    main()
