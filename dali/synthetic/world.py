"""The built-in synthetic audiovisual world: seeded scenes written as real files in the real formats.

A scene has a place (seen, silent), 1–3 sound sources heard in sequence (each visible or not) and 0–2 silent
objects that are only seen. Each source class has a visual glyph (shape + colour) and a procedural sound.
Image captions say what is seen (objects, colours, place); audio captions say only what is heard
(sources, order, loudness), in varied wording: the modality gap of the paper, in miniature.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, ImageDraw

from dali.constants import NUM_FRAMES
from dali.cpu_kernels import kernels_key
from dali.files import atomic_write, atomic_write_json, atomic_write_text
from dali.logs import log
from dali.synthetic import sounds
from dali.workers import worker_pool

DURATION_S = 10.0
FRAME_SIZE = 64
WORLD_VERSION = 4


@dataclass(frozen=True)
class SourceClass:
    name: str
    colour: str
    rgb: tuple[int, int, int]
    shape: str
    actions: tuple[str, ...]  # present-tense phrasings of its sound, "a dog barks"
    synth: str  # generator in dali.synthetic.sounds


SOURCES = (
    SourceClass(
        "dog", "brown", (140, 85, 40), "triangle", ("a dog barks", "a dog is barking", "a dog barks repeatedly"), "bark"
    ),
    SourceClass(
        "bell", "yellow", (240, 210, 30), "circle", ("a bell rings", "a bell is ringing", "a bell chimes"), "bell"
    ),
    SourceClass(
        "car",
        "grey",
        (160, 160, 170),
        "square",
        ("a car engine hums", "a car passes by", "a car drives past"),
        "engine",
    ),
    SourceClass(
        "bird", "blue", (40, 90, 220), "diamond", ("a bird chirps", "a bird is chirping", "a bird sings"), "chirp"
    ),
    SourceClass(
        "stream", "cyan", (40, 200, 220), "wave", ("water flows", "a stream trickles", "water is running"), "stream"
    ),
    SourceClass(
        "drum", "red", (210, 40, 40), "ring", ("a drum beats", "a drum is played", "someone plays a drum"), "drum"
    ),
    SourceClass(
        "siren", "orange", (250, 140, 20), "cross", ("a siren wails", "a siren is blaring", "a siren sounds"), "siren"
    ),
    SourceClass(
        "whistle",
        "black",
        (20, 20, 20),
        "bar",
        ("someone whistles", "a whistle blows", "a whistle is blown"),
        "whistle",
    ),
    SourceClass(
        "clock",
        "purple",
        (140, 60, 180),
        "star",
        ("a clock ticks", "a clock is ticking", "a clock ticks steadily"),
        "tick",
    ),
    SourceClass(
        "phone",
        "pink",
        (240, 110, 180),
        "hexagon",
        ("a phone rings", "a telephone rings", "a phone is ringing"),
        "ring",
    ),
    # Two sources with one sound: audio alone cannot tell them apart, the frame can (when they are in view).
    SourceClass(
        "hammer", "teal", (0, 128, 128), "pentagon", ("a hammer knocks", "someone hammers", "a hammer pounds"), "knock"
    ),
    SourceClass(
        "door",
        "navy",
        (25, 30, 110),
        "door",
        ("someone knocks on a door", "a door is knocked on", "a knock at the door"),
        "knock",
    ),
)
PLACES = {
    "grass": ("on the grass", (60, 140, 60)),
    "beach": ("at the beach", (220, 200, 150)),
    "street": ("in the street", (70, 70, 75)),
    "room": ("in a room", (205, 185, 160)),
    "snow": ("in the snow", (235, 240, 245)),
}
LOUDNESS = {"quiet": 0.12, "normal": 0.35, "loud": 0.8}
LOUDNESS_WORDS = {
    "quiet": ("softly", "quietly", "faintly"),
    "normal": ("",),
    "loud": ("loudly", "loudly", "very loudly"),
}
THEN_WORDS = (", then ", " and then ", ", after which ", ", and after that ")


@dataclass
class Event:
    source: int  # index into SOURCES
    start: float
    duration: float
    loudness: str
    visible: bool


@dataclass
class Scene:
    id: str
    place: str
    events: list[Event]
    silent: list[int]  # seen, not heard
    layout: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # source -> (x, y, size)
    seed: int = 0

    @property
    def visible(self) -> list[int]:
        seen = [e.source for e in self.events if e.visible] + self.silent
        return sorted(seen, key=lambda s: self.layout[s][0])


def sample_scene(rng: np.random.Generator, scene_id: str) -> Scene:
    count = int(rng.choice([1, 2, 3], p=[0.35, 0.4, 0.25]))
    chosen = rng.choice(len(SOURCES), size=count + 2, replace=False).tolist()
    heard, others = chosen[:count], chosen[count:]
    events, start = [], float(rng.uniform(0.0, 1.5))
    for source in heard:
        duration = float(rng.uniform(2.0, 4.0))
        duration = min(duration, DURATION_S - start)
        events.append(
            Event(
                source, start, duration, str(rng.choice(list(LOUDNESS), p=[0.25, 0.5, 0.25])), bool(rng.random() < 0.8)
            )
        )
        start = min(start + duration * float(rng.uniform(0.7, 1.0)), DURATION_S - 2.0)
    seen_heard = sum(e.visible for e in events)
    silent_count = min(int(rng.choice([0, 1, 2], p=[0.5, 0.35, 0.15])), 3 - seen_heard)  # 3 places in a frame
    scene = Scene(scene_id, str(rng.choice(list(PLACES))), events, others[:silent_count])
    slots = rng.permutation(3)
    for slot, source in zip(slots, [e.source for e in events if e.visible] + scene.silent):
        x = (slot + 0.5) / 3 + rng.uniform(-0.06, 0.06)
        scene.layout[source] = (float(x), float(rng.uniform(0.3, 0.7)), float(rng.uniform(0.27, 0.34)))
    scene.seed = int(rng.integers(2**31))
    return scene


# -- captions ------------------------------------------------------------------------------------------
def audio_caption(scene: Scene, rng: np.random.Generator) -> str:
    """What is heard, in order, with loudness: 'a dog barks loudly, then a bell rings'."""
    if not scene.events:
        return "silence"
    parts = []
    for event in sorted(scene.events, key=lambda e: e.start):
        action = str(rng.choice(SOURCES[event.source].actions))
        adverb = str(rng.choice(LOUDNESS_WORDS[event.loudness]))
        parts.append(f"{action} {adverb}".strip())
    text = parts[0]
    for part in parts[1:]:
        text += str(rng.choice(THEN_WORDS)) + part
    return text


def visual_caption(scene: Scene, rng: np.random.Generator) -> str:
    """What is seen: objects with colours, left to right, and the place."""
    place = PLACES[scene.place][0]
    objects = [
        f"{'an' if SOURCES[s].colour[0] in 'aeiou' else 'a'} {SOURCES[s].colour} {SOURCES[s].name}"
        for s in scene.visible
    ]
    if not objects:
        return str(rng.choice([f"an empty scene {place}", f"nothing {place}"]))
    listed = objects[0] if len(objects) == 1 else ", ".join(objects[:-1]) + " and " + objects[-1]
    return str(rng.choice([f"{listed} {place}", f"there is {listed} {place}", f"a picture of {listed} {place}"]))


def imagined_sounds(scene: Scene, rng: np.random.Generator) -> str:
    """What an image captioner guesses one would hear: a sound for every visible object, silent or not, left to
    right, with no order in time and no loudness (a picture shows neither)."""
    objects = [str(rng.choice(SOURCES[s].actions)) for s in scene.visible]
    if not objects:
        return "nothing can be heard"
    return objects[0] if len(objects) == 1 else ", ".join(objects[:-1]) + " and " + objects[-1]


# words that name each source in captions of either kind (object names and the nouns of their sounds)
SOURCE_WORDS = (
    ("dog",),
    ("bell",),
    ("car",),
    ("bird",),
    ("water", "stream"),
    ("drum",),
    ("siren",),
    ("whistle", "whistles"),
    ("clock",),
    ("phone", "telephone"),
    ("hammer", "hammers"),
    ("door",),
)


def mentioned_sources(caption: str) -> set[int]:
    """Indices of the sources a caption names."""
    words = set(caption.lower().replace(",", " ").split())
    return {index for index, names in enumerate(SOURCE_WORDS) if words & set(names)}


def source_scores(captions: dict[str, str], scenes: dict[str, "Scene | dict"]) -> dict[str, float]:
    """Precision and recall of the heard sources a set of captions names (a diagnostic the metrics lack)."""
    hits = named = heard = 0
    for clip_id, caption in captions.items():
        scene = scenes[clip_id]
        events = scene["events"] if isinstance(scene, dict) else [dataclasses.asdict(e) for e in scene.events]
        truth = {event["source"] for event in events}
        said = mentioned_sources(caption)
        hits, named, heard = hits + len(truth & said), named + len(said), heard + len(truth)
    return {"heard_source_precision": hits / max(named, 1), "heard_source_recall": hits / max(heard, 1)}


def sound_sentences(rng: np.random.Generator, count: int) -> list[str]:
    """Generic sentences about sounds, tied to no clip: the small LM's stand-in for text pretraining."""
    return [audio_caption(sample_scene(rng, f"text{i}"), rng) for i in range(count)]


# -- rendering -----------------------------------------------------------------------------------------
def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    def regular(n, rotation=0.0, radii=(1.0,)):
        return [
            (
                cx + r * radii[i % len(radii)] * math.cos(rotation + 2 * math.pi * i / n),
                cy + r * radii[i % len(radii)] * math.sin(rotation + 2 * math.pi * i / n),
            )
            for i in range(n)
        ]

    return {
        "triangle": regular(3, -math.pi / 2),
        "square": regular(4, math.pi / 4),
        "diamond": regular(4),
        "hexagon": regular(6),
        "pentagon": regular(5, -math.pi / 2),
        "door": [(cx - r * 0.55, cy - r), (cx + r * 0.55, cy - r), (cx + r * 0.55, cy + r), (cx - r * 0.55, cy + r)],
        "star": regular(10, -math.pi / 2, (1.0, 0.45)),
    }.get(shape)


def render_frame(scene: Scene, frame: int, size: int = FRAME_SIZE) -> Image.Image:
    rng = np.random.default_rng(scene.seed + 1000 * frame)
    base = np.array(PLACES[scene.place][1], dtype=np.float32)
    texture = np.random.default_rng(scene.seed).normal(0, 12, (size, size, 1)) + rng.normal(0, 3, (size, size, 1))
    image = Image.fromarray(np.clip(base + texture, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for source in scene.visible:
        x, y, scale = scene.layout[source]
        cx, cy, r = (x + 0.01 * (frame - 5)) * size, y * size, scale * size / 2
        colour, shape = SOURCES[source].rgb, SOURCES[source].shape
        points = _polygon(shape, cx, cy, r)
        if points:
            draw.polygon(points, fill=colour)
        elif shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        elif shape == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=max(2, int(r / 2.5)))
        elif shape == "cross":
            w = r / 2.5
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
        elif shape == "bar":
            draw.rectangle([cx - r / 3, cy - r, cx + r / 3, cy + r], fill=colour)
        elif shape == "wave":
            xs = np.linspace(cx - r, cx + r, 12)
            draw.line(
                [(float(a), float(cy + r / 2 * math.sin((a - cx) / r * 2 * math.pi))) for a in xs],
                fill=colour,
                width=max(2, int(r / 2.5)),
            )
    return image


def render_audio(scene: Scene, background: float = 0.004) -> np.ndarray:
    """The scene's sound: its events at their loudness over a background noise of gain ``background``."""
    rng = np.random.default_rng(scene.seed)
    out = background * sounds.background(rng, DURATION_S)
    for event in scene.events:
        signal = getattr(sounds, SOURCES[event.source].synth)(rng, event.duration)
        begin = int(event.start * sounds.RATE)
        end = min(begin + signal.size, out.size)
        out[begin:end] += LOUDNESS[event.loudness] * signal[: end - begin]
    return np.clip(out, -1.0, 1.0).astype(np.float32)


# -- the world on disk ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorldConfig:
    seed: int = 0
    captioner_scenes: int = 3000
    text_sentences: int = 3000
    prefix_pairs: int = 16
    align_clips: int = 1000
    val_clips: int = 100
    pseudo_clips: int = 500
    test_clips: int = 100
    references: int = 5

    def digest(self) -> str:
        text = json.dumps(dataclasses.asdict(self) | {"version": WORLD_VERSION}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


REDUCED = WorldConfig(
    captioner_scenes=400, text_sentences=400, align_clips=64, val_clips=16, pseudo_clips=32, test_clips=12
)
SPLITS = ("prefix", "align", "val", "pseudo", "test")


def trained_key(world: Path, settings) -> str:
    """The cache key of a model trained on ``world`` with ``settings`` (a dataclass) under the kernels in force:
    a captioner or encoder is reused only when its marker names this key."""
    digest = json.loads((Path(world) / "world.json").read_text())["digest"]
    return json.dumps({"world": digest, "kernels": kernels_key(), **dataclasses.asdict(settings)}, sort_keys=True)


def holds_trained(out: Path, marker: str, key: str) -> bool:
    """Whether ``out`` holds a finished model made with ``key`` (its marker, written last, names it)."""
    return (out / marker).exists() and json.loads((out / marker).read_text()).get("key") == key


def trained_checkpoint(out: Path, key: str) -> Path:
    """Where a training of ``key`` keeps its resumable state in ``out``; the checkpoints of other settings or
    worlds there are removed (never resumed)."""
    path = Path(out) / f"checkpoint-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    for other in Path(out).glob("checkpoint-*.pt"):
        if other != path:
            other.unlink()
    return path


def resume_trained(path: Path, trained: dict) -> dict | None:
    """The position a killed training saved after its last finished epoch (``dali.training.save_training``), its
    objects' states loaded into ``trained``; None: from the start (an unreadable checkpoint too: this is a cache)."""
    from dali.models.checkpoints import CheckpointError
    from dali.training import resume_training

    try:
        position = resume_training(path, trained)
    except CheckpointError as error:
        log.warning("%s: starting over (%s)", path.parent, error)
        return None
    if position is not None:
        log.info("%s: resuming after epoch %d", path.parent, position["epoch"])
    return position


def write_clip(args: tuple[Scene, str]) -> None:
    scene, root = args
    root_path = Path(root)
    soundfile.write(root_path / "audio" / f"{scene.id}.wav", render_audio(scene), sounds.RATE, subtype="PCM_16")
    for frame in range(NUM_FRAMES):
        render_frame(scene, frame).save(root_path / "frames" / f"frame_{frame}" / f"{scene.id}.jpg", quality=92)


def generate_world(root: str | Path, config: WorldConfig = WorldConfig(), workers: int = 2) -> Path:
    """Write the world under ``root`` (idempotent: a finished world with the same config is kept)."""
    root = Path(root)
    marker = root / "world.json"
    if marker.exists() and json.loads(marker.read_text()).get("digest") == config.digest():
        return root
    rng = np.random.default_rng(config.seed)  # one stream, drawn in this order: the same world for the same seed
    (root / "audio").mkdir(parents=True, exist_ok=True)
    for frame in range(NUM_FRAMES):
        (root / "frames" / f"frame_{frame}").mkdir(parents=True, exist_ok=True)
    _write_captioner_data(root, config, rng)
    counts = {
        "prefix": config.prefix_pairs,
        "align": config.align_clips,
        "val": config.val_clips,
        "pseudo": config.pseudo_clips,
        "test": config.test_clips,
    }
    scenes = {split: [sample_scene(rng, f"{split}{i:05d}") for i in range(n)] for split, n in counts.items()}
    jobs = [(scene, str(root)) for split in SPLITS for scene in scenes[split]]
    if workers > 1:
        with worker_pool(workers) as pool:
            list(pool.map(write_clip, jobs, chunksize=16))
    else:
        for job in jobs:
            write_clip(job)
    _write_lists(root, scenes, config, rng)
    atomic_write_json(root / "scenes.json", {split: [dataclasses.asdict(s) for s in scenes[split]] for split in SPLITS})
    atomic_write_json(marker, {"digest": config.digest(), "config": dataclasses.asdict(config)})
    return root


def _write_captioner_data(root: Path, config: WorldConfig, rng: np.random.Generator) -> None:
    """The image captioner's data: images with visual captions and imagined sounds, plus generic sound text."""
    (root / "captioner" / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(config.captioner_scenes):
        scene = sample_scene(rng, f"img{i:05d}")
        render_frame(scene, 5).save(root / "captioner" / "images" / f"{scene.id}.jpg", quality=92)
        caption, sounds = visual_caption(scene, rng), imagined_sounds(scene, rng)
        records.append({"id": scene.id, "image": f"images/{scene.id}.jpg", "caption": caption, "sounds": sounds})
    atomic_write_json(root / "captioner" / "captions.json", records)
    atomic_write_text(root / "captioner" / "text.txt", "\n".join(sound_sentences(rng, config.text_sentences)) + "\n")


def _write_lists(root: Path, scenes: dict, config: WorldConfig, rng: np.random.Generator) -> None:
    """The prefix pairs (the original's prefixDS.json layout), the CAV-MAE lists and the AudioCaps-style test CSV
    with ``config.references`` distinct captions per clip."""
    question = "<image>\nDescribe the sound that can be heard in this scene."
    pairs = []
    for s in scenes["prefix"]:
        turns = [{"from": "human", "value": question}, {"from": "gpt", "value": audio_caption(s, rng)}]
        files = {"image": f"frames/frame_5/{s.id}.jpg", "audio": f"audio/{s.id}.wav"}
        pairs.append({"id": s.id, **files, "conversations": turns})
    atomic_write_json(root / "prefix_pairs.json", pairs)
    for split in ("align", "val", "pseudo"):
        rows = [
            {"video_id": s.id, "wav": f"audio/{s.id}.wav", "video_path": "frames", "labels": ""} for s in scenes[split]
        ]
        atomic_write_json(root / f"{split}.json", {"data": rows})
    lines = [["youtube_id", "caption"]]
    for scene in scenes["test"]:
        captions = set()
        for _ in range(50):
            captions.add(audio_caption(scene, rng))
            if len(captions) == config.references:
                break
        lines += [[scene.id, caption] for caption in sorted(captions)]
    atomic_write(root / "test.csv", lambda tmp: _write_csv(tmp, lines))


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as stream:
        csv.writer(stream).writerows(rows)


# -- a second test set, across a domain shift: the world's Clotho ---------------------------------------------
FAR_FOLDER = "clotho"
FAR_BACKGROUND = 0.04  # 20 dB above the world's background noise: the same sources, recorded elsewhere
FAR_SEED_OFFSET = 7_919  # its scenes come from their own stream: the world's files are never drawn differently


def generate_far_test_set(root: str | Path, config: WorldConfig = WorldConfig()) -> Path:
    """``root/clotho``: a test set that plays Clotho beside the AudioCaps-like test.csv (idempotent). Audio only
    (Clotho has no video), five references per clip in Clotho's wide CSV layout (file_name, caption_1..5), and a
    domain shift: the background noise 20 dB louder. Its own random stream leaves the world's files unchanged."""
    folder = Path(root) / FAR_FOLDER
    marker = folder / "split.json"
    digest = hashlib.sha256(f"{config.digest()}:{FAR_BACKGROUND}:{FAR_SEED_OFFSET}".encode()).hexdigest()[:16]
    if marker.exists() and json.loads(marker.read_text()).get("digest") == digest:
        return folder
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed + FAR_SEED_OFFSET)
    lines = [["file_name", *(f"caption_{k}" for k in range(1, config.references + 1))]]
    for index in range(config.test_clips):
        scene = sample_scene(rng, f"far{index:05d}")
        soundfile.write(
            folder / "audio" / f"{scene.id}.wav", render_audio(scene, FAR_BACKGROUND), sounds.RATE, "PCM_16"
        )
        captions = [audio_caption(scene, rng) for _ in range(config.references)]  # repeats allowed, as in Clotho
        lines.append([f"{scene.id}.wav", *captions])
    atomic_write(folder / "test.csv", lambda tmp: _write_csv(tmp, lines))
    atomic_write_json(marker, {"digest": digest, "clips": config.test_clips, "background": FAR_BACKGROUND})
    return folder
