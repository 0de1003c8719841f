"""The service's token accounting: image tokens by model family and detail, text tokens, message overhead.

Pure functions. The estimator, the limiter's reservations and the emulator's billing all call these,
so an estimate and a bill agree to the token.

Image rule (reference, "Image tokens"): ``low`` is a flat 85 tokens (a 512×512 view). ``high`` fits the
image into 2048×2048, then shrinks it so its short side is at most 768 px (never enlarging), and bills
85 + 170 for each 512-px tile of that view. ``auto`` lets the service choose; we count it as ``high``, the
upper bound. Published checks: 1024×1024 high = 765, 2048×4096 high = 1105, 4096×8192 low = 85,
640×480 high = 425.

Rounding: no source says how fractional pixels round after a resize. We round every scaled side *up*
(integer arithmetic, no floats), at least 1 px: never an underestimate, and the same numbers whether the
pixels are counted here, in the emulator, or after ``images.py`` has downscaled the file to this view.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import itertools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

LOW_VIEW_PX = 512  # low detail: "a lower resolution 512x512 version"
HIGH_FIT_PX = 2048  # high detail: first fit into 2048×2048
HIGH_SHORT_SIDE_PX = 768  # then the short side down to 768
TILE_PX = 512

# OpenAI's chat accounting: every message costs 3 tokens plus its role and content; every reply is
# primed with 3 more (<|start|>assistant<|message|>).
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


# bpe-openai refuses one piece of text of this many characters or more ("Input too long to encode
# safely"); longer text is counted in pieces cut at line ends or spaces (see text_tokens).
ENCODE_MAX_CHARS = 1_000_000
ENCODE_PIECE_CHARS = 256 * 1024
CACHED_TEXT_CHARS = 4096  # prompts up to this long are counted once per run, however many rows share them


@dataclass(frozen=True, slots=True)
class ModelFamily:
    encoding: str  # the BPE used for text
    image_base_tokens: int  # the low view, billed for every image
    image_tile_tokens: int  # each 512-px tile at high detail
    context_tokens: int = 128_000  # prompt + max_tokens must fit; the vision models of gpt-4 are 128k


GPT4_TURBO = ModelFamily("cl100k_base", 85, 170)
# Longest matching prefix wins. gpt-4o-mini bills images at a higher rate to keep its low text price.
MODEL_FAMILIES: Mapping[str, ModelFamily] = {
    "gpt-4": GPT4_TURBO,  # gpt-4-turbo, gpt-4-turbo-2024-04-09, gpt-4-vision-preview
    "gpt-4o": ModelFamily("o200k_base", 85, 170),
    "gpt-4o-mini": ModelFamily("o200k_base", 2833, 5667),
    "gpt-4.1": ModelFamily("o200k_base", 85, 170, context_tokens=1_047_576),
    "gpt-4.5": ModelFamily("o200k_base", 85, 170),
    "o1": ModelFamily("o200k_base", 75, 150, context_tokens=200_000),
    "o3": ModelFamily("o200k_base", 75, 150, context_tokens=200_000),
}


@lru_cache(maxsize=64)  # called several times per row with the run's one model name
def model_family(model: str) -> ModelFamily:
    """The accounting family of a model name; unknown names count as gpt-4-turbo."""
    name = model.lower()
    matches = [prefix for prefix in MODEL_FAMILIES if name.startswith(prefix)]
    return MODEL_FAMILIES[max(matches, key=len)] if matches else GPT4_TURBO


def _scale_to(width: int, height: int, limit: int, side: int) -> tuple[int, int]:
    """Shrink so that `side` (the long or short side) is at most `limit`; round up, never enlarge."""
    if side <= limit:
        return width, height
    return max(1, -(-width * limit // side)), max(1, -(-height * limit // side))


def viewed_size(width: int, height: int, detail: str) -> tuple[int, int]:
    """The pixels the service looks at for an image of this size and detail (auto counts as high)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}×{height}")
    if detail == "low":
        return _scale_to(width, height, LOW_VIEW_PX, max(width, height))
    width, height = _scale_to(width, height, HIGH_FIT_PX, max(width, height))
    return _scale_to(width, height, HIGH_SHORT_SIDE_PX, min(width, height))


def image_tokens(width: int, height: int, detail: str, model: str = "gpt-4-turbo") -> int:
    """Prompt tokens billed for one image of `width`×`height` px at `detail` ("auto" counts as "high")."""
    family = model_family(model)
    if detail == "low":
        viewed_size(width, height, detail)  # validates the size
        return family.image_base_tokens
    w, h = viewed_size(width, height, "high")
    tiles = -(-w // TILE_PX) * -(-h // TILE_PX)
    return family.image_base_tokens + family.image_tile_tokens * tiles


def max_image_tokens(detail: str, model: str = "gpt-4-turbo") -> int:
    """The most one image can cost at `detail`: the bound used when its size is unknown."""
    # The largest high view is 768×2048: 2 × 4 tiles.
    return image_tokens(HIGH_SHORT_SIDE_PX, HIGH_FIT_PX, detail, model)


_counters: dict[str, Callable[[str], int]] = {}
_counters_lock = threading.Lock()  # a run builds its encoding in a thread while the loop reads rows


def _counter(name: str) -> Callable[[str], int]:
    """Counts the tokens of a text in encoding `name`; built once per process."""
    with _counters_lock:
        if name not in _counters:
            _counters[name] = _rust_counter(name) or _public_counter(name)
        return _counters[name]


def _rust_counter(name: str) -> Callable[[str], int] | None:
    """bpe-openai's Rust tokenizer for `name`, loaded without importing the bpe_openai package; None when
    this release does not have it where 0.1.4 has it.

    Importing bpe_openai decodes the tables of every encoding it ships into Python dicts for tiktoken's
    API, which we do not use: ~1.2 s of the GIL and ~36 MB, at every start of a run. Its extension module
    builds the same tokenizer from its own copy of the table in ~40 ms. tests/test_tokens.py checks that
    both count alike.
    """
    package = importlib.util.find_spec("bpe_openai")  # finds the package's folder, runs none of it
    folders = list(package.submodule_search_locations or []) if package is not None else []
    for folder, suffix in itertools.product(folders, importlib.machinery.EXTENSION_SUFFIXES):
        path = Path(folder) / f"_bindings{suffix}"
        if not path.is_file():
            continue
        spec = importlib.util.spec_from_file_location("bpe_openai._bindings", path)
        if spec is None or spec.loader is None:
            return None
        bindings = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bindings)
        count: Callable[[str], int] = bindings.tokenizer_for_encoding(name).count
        return count
    return None


def _public_counter(name: str) -> Callable[[str], int]:
    """The same count through bpe_openai's public API (slow to import: see ``_rust_counter``)."""
    import bpe_openai  # ships its tables: works offline, unlike tiktoken

    encoding = bpe_openai.get_encoding(name)
    # user text that looks like a special token is plain text to the service, not an error
    return lambda text: len(encoding.encode(text, disallowed_special=()))


def load_encoding(model: str) -> None:
    """Build the text encoding of `model` now, so that the first token count does not wait for it.

    Blocking: ~40 ms the first time, nothing after.
    """
    _counter(model_family(model).encoding)


def text_tokens(text: str, model: str = "gpt-4-turbo") -> int:
    """Tokens of `text` in the model's encoding (cl100k_base for gpt-4-turbo, o200k_base for gpt-4o).

    Exact for any text shorter than ENCODE_MAX_CHARS. Longer text (a pasted document in a manifest) is
    counted in pieces cut before a line end or a space, where the encodings split words anyway; the
    count may differ from the service's by a token per cut, far less than what decides that such a
    prompt is over the model's context.
    """
    encoding = model_family(model).encoding
    if len(text) <= CACHED_TEXT_CHARS:
        return _short_text_tokens(text, encoding)
    if len(text) < ENCODE_MAX_CHARS:
        return _count(text, encoding)
    return sum(_count(piece, encoding) for piece in _pieces(text, ENCODE_PIECE_CHARS))


@lru_cache(maxsize=1024)
def _short_text_tokens(text: str, encoding: str) -> int:
    return _count(text, encoding)


def _count(text: str, encoding: str) -> int:
    return _counter(encoding)(text)


def _pieces(text: str, size: int) -> list[str]:
    """`text` cut into pieces of at most `size` characters, each cut before a newline or space if any."""
    pieces, start = [], 0
    while len(text) - start > size:
        end = start + size
        cut = max(text.rfind("\n", start + 1, end), text.rfind(" ", start + 1, end))
        cut = cut if cut > start else end
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def count_prompt_tokens(
    messages: Sequence[Mapping[str, Any]],
    image_sizes: Sequence[tuple[int, int] | None],
    model: str = "gpt-4-turbo",
) -> int:
    """Prompt tokens of a chat request: text, per-message overhead and every image.

    `image_sizes` gives, in order of appearance, the pixel size of each ``image_url`` part; None means
    unknown, which is counted at the most an image of its detail can cost. Raises ValueError when the
    numbers of image parts and sizes differ.
    """
    total = TOKENS_PER_REPLY
    images_seen = 0
    for message in messages:
        total += TOKENS_PER_MESSAGE + text_tokens(str(message.get("role", "")), model)
        content = message.get("content", "")
        if isinstance(content, str):
            total += text_tokens(content, model)
            continue
        for part in content:
            if part.get("type") == "text":
                total += text_tokens(str(part.get("text", "")), model)
            elif part.get("type") == "image_url":
                if images_seen >= len(image_sizes):
                    raise ValueError("fewer image sizes than image parts")
                detail = str(part["image_url"].get("detail", "auto"))
                size = image_sizes[images_seen]
                images_seen += 1
                total += (
                    max_image_tokens(detail, model) if size is None else image_tokens(*size, detail, model)
                )
    if images_seen != len(image_sizes):
        raise ValueError("more image sizes than image parts")
    return total
