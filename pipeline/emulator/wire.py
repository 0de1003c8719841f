"""What the emulator says: a chat body validated as the service validates it, its prompt tokens counted by
``pipeline.tokens``, and the bodies of the answers (the reference's 200, Azure's errors). Pure: no I/O.

An http(s) image is never fetched: its size is unknown, so it is billed at the most an image of its
detail can cost. A data-URL image's size comes from its header (Pillow, no full decode).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http
import json
import random
import re
import time
from dataclasses import dataclass
from functools import cache
from io import BytesIO
from typing import Any

import bpe_openai
from PIL import Image

from pipeline import tokens
from pipeline.records import DETAILS, FILTER_CATEGORIES

FILTER_MARKER = "[[filter]]"  # a prompt holding it is refused: HTTP 400, error.code "content_filter"
COMPLETION_FILTER_MARKER = "[[filter-completion]]"  # 200 with finish_reason "content_filter", no content
FINISH_OBJECT_MARKER = "[[finish-object]]"  # finish_reason as an object, as some Azure deployments send it
# Structured answers (response_format json_object or json_schema):
REFUSE_MARKER = "[[refuse]]"  # the model declines: message.refusal, no content
TRUNCATE_MARKER = "[[truncate]]"  # the JSON is cut before its end: finish_reason "length"
BREAK_SCHEMA_MARKER = "[[break-schema]]"  # JSON that does not hold to the schema (as a non-strict call may)
# Azure's GPT-4 Turbo with Vision "does not support JSON mode or function calling with image input" (reference)
NO_JSON_WITH_IMAGES = ("gpt-4-turbo", "gpt-4-vision")

MAX_IMAGES_PER_REQUEST = 10  # reference: "a limit of 10 images per chat request"
DEFAULT_MAX_TOKENS = 16  # reference: without max_tokens "the return output will be cut off"
DESCRIPTION_WORDS = (20, 80)
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP")  # what the service accepts

_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,(.*)", re.DOTALL)
_SAFE = {category: {"filtered": False, "severity": "safe"} for category in FILTER_CATEGORIES}
_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}
NOT_JSON = object()  # the body of a request that could not be parsed

# The services' own words, so that a client's error messages read as they will in production.
_FILTERED_400 = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content management policy. "
    "Please modify your prompt and retry."
)
_SERVER_500 = "The server had an error while processing your request. Sorry about that!"


@dataclass(frozen=True, slots=True)
class Prompt:
    """A valid request, as much of it as the answer needs."""

    model: str  # for token accounting
    prompt_text: str
    image_sizes: tuple[tuple[int, int] | None, ...]
    prompt_tokens: int
    max_tokens: int
    seed: int  # from the prompt text and image URLs: the same request gets the same description
    response_format: dict[str, Any] | None = None  # json_object or json_schema; None for text


class Invalid(Exception):
    """The body breaks a rule of the API: a 400 naming the parameter."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


def parse_json(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        return NOT_JSON


def user_text(body: object) -> str:
    """The text parts of the user messages joined with newlines; tolerant of any body."""
    messages = body.get("messages") if isinstance(body, dict) else None
    texts: list[str] = []
    for message in messages if isinstance(messages, list) else ():
        is_user = isinstance(message, dict) and message.get("role") == "user"
        content = message.get("content") if is_user else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return "\n".join(texts)


def _image_size(url: str, param: str) -> tuple[int, int] | None:
    """The size of a data-URL image, read from its header; None for an http(s) URL (never fetched)."""
    if url.startswith(("http://", "https://")):
        return None
    if (match := _DATA_URL.fullmatch(url)) is None:
        raise Invalid("Invalid image URL: use http(s) or data:image/<format>;base64,<data>.", param)
    try:
        with Image.open(BytesIO(base64.b64decode(match.group(1), validate=True))) as image:
            image_format, size = image.format, image.size
    except (binascii.Error, OSError, ValueError, Image.DecompressionBombError) as err:
        raise Invalid(f"Invalid image data ({type(err).__name__}).", param, "BadRequest") from None
    if image_format not in IMAGE_FORMATS:
        raise Invalid(f"Unsupported image format {image_format}: use {', '.join(IMAGE_FORMATS)}.", param)
    return size


def _image_parts(content: object, role: str, where: str) -> list[tuple[str, str]]:
    """Validate one message's content; return its images as (url, param) pairs."""
    if isinstance(content, str):
        return []
    if not isinstance(content, list):
        raise Invalid("content must be a string or an array of parts.", f"{where}.content", "invalid_type")
    images = []
    for n, part in enumerate(content):
        param = f"{where}.content.[{n}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        image_url = part.get("image_url") if kind == "image_url" else None
        if not isinstance(image_url, dict) or not isinstance(image_url.get("url"), str):
            raise Invalid("A part is {type: text, text} or {type: image_url, image_url: {url}}.", param)
        if role != "user":
            raise Invalid("Image URLs are only allowed for messages with role 'user'.", param)
        if image_url.get("detail", "auto") not in DETAILS:
            raise Invalid("Invalid detail: use 'low', 'high' or 'auto'.", f"{param}.image_url.detail")
        images.append((image_url["url"], f"{param}.image_url.url"))
    return images


def inspect_body(body: object, default_model: str | None) -> Prompt:
    """Validate a chat body as the service does and count its prompt tokens; raises Invalid.

    `default_model` is the deployment's model (Azure); None means the body must name one (OpenAI).
    """
    if not isinstance(body, dict):
        raise Invalid("The body must be a JSON object.", None, "invalid_type")
    model = body.get("model") if default_model is None else default_model
    if not isinstance(model, str) or not model:
        raise Invalid("You must provide a model parameter.", "model", "missing_required_parameter")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        code = "missing_required_parameter" if messages is None else "invalid_type"
        raise Invalid("'messages' must be a non-empty array.", "messages", code)
    images: list[tuple[str, str]] = []
    for n, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("system", "user", "assistant"):
            raise Invalid(f"Invalid role {role!r}: use system, user or assistant.", f"messages.[{n}].role")
        images += _image_parts(message.get("content"), role, f"messages.[{n}]")
    if len(images) > MAX_IMAGES_PER_REQUEST:
        message = f"Too many images in request. Max is {MAX_IMAGES_PER_REQUEST}."
        raise Invalid(message, "messages", "BadRequest")
    max_tokens = body.get("max_tokens", DEFAULT_MAX_TOKENS)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise Invalid(f"Invalid max_tokens {max_tokens!r}: must be an integer of at least 1.", "max_tokens")
    response_format = _response_format(body, model, has_images=bool(images))
    sizes = tuple(_image_size(url, param) for url, param in images)
    try:
        prompt_tokens = tokens.count_prompt_tokens(messages, sizes, model)
    except ValueError as err:  # text the encoder refuses, such as a special token
        raise Invalid(str(err).splitlines()[0], "messages") from None
    text = user_text(body)
    digest = hashlib.sha256(text.encode())
    for url, _ in images:
        digest.update(url.encode())
    seed = int.from_bytes(digest.digest()[:8], "big")
    return Prompt(model, text, sizes, prompt_tokens, max_tokens, seed, response_format)


def _response_format(body: dict[str, Any], model: str, *, has_images: bool) -> dict[str, Any] | None:
    """The request's response_format, checked as the services check it; None for plain text."""
    value = body.get("response_format")
    if value is None or value == {"type": "text"}:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("json_object", "json_schema"):
        raise Invalid(
            "Invalid value for 'response_format.type': use text, json_object or json_schema.",
            "response_format",
        )
    if has_images and model.lower().startswith(NO_JSON_WITH_IMAGES):
        raise Invalid(f"Invalid parameter: 'response_format' of type '{kind}' is not supported with this model.",
                      "response_format")  # fmt: skip
    if kind == "json_object" and "json" not in json.dumps(body.get("messages")).lower():
        raise Invalid("'messages' must contain the word 'json' in some form, to use 'response_format' of type "
                      "'json_object'.", "messages")  # fmt: skip
    spec = value.get("json_schema")
    if kind == "json_schema" and not (
        isinstance(spec, dict) and isinstance(spec.get("schema"), dict) and spec.get("name")
    ):
        raise Invalid("Missing required parameter: 'response_format.json_schema' with a name and a schema.",
                      "response_format.json_schema", "missing_required_parameter")  # fmt: skip
    checked: dict[str, Any] = value
    return checked


_SUBJECTS = (
    "a weathered wooden boat",
    "two children on bicycles",
    "a tabby cat asleep on a windowsill",
    "an old stone bridge",
    "a bowl of ripe lemons",
    "a lighthouse",
    "a crowded market stall",
    "a red tram",
    "a field of sunflowers",
    "a kitchen table set for breakfast",
)
_SETTINGS = (
    "in soft morning light",
    "under a grey sky",
    "beside a narrow canal",
    "at dusk",
    "against a plain white wall",
    "on a quiet street",
    "after the rain",
)
_REMARKS = (
    "The colours are muted and warm.",
    "Shadows fall to the left, suggesting late afternoon.",
    "The focus is sharp in the centre and softens toward the edges.",
    "Nothing in the frame appears to be moving.",
    "A few details are too small to make out.",
    "The composition leaves generous empty space at the top.",
    "Textures of wood, stone and fabric are clearly visible.",
    "There is no visible text.",
)


def _describe(prompt: Prompt) -> str:
    """A plausible description, the same for the same request: 20 to 80 words naming each image's size."""
    rng = random.Random(prompt.seed)
    wanted = rng.randint(*DESCRIPTION_WORDS)
    sentences = ["The request holds no image, so there is nothing to see."] if not prompt.image_sizes else []
    for n, size in enumerate(prompt.image_sizes, start=1):
        name = "The image" if len(prompt.image_sizes) == 1 else f"Image {n}"
        seen = f"{size[0]}x{size[1]} pixels" if size else "a remote image, not fetched"
        sentences.append(f"{name} ({seen}) shows {rng.choice(_SUBJECTS)} {rng.choice(_SETTINGS)}.")
    while len(" ".join(sentences).split()) < wanted:
        sentences.append(rng.choice(_REMARKS))
    return " ".join(" ".join(sentences).split()[:wanted]).rstrip(".,;") + "."


@cache
def _encoding(name: str) -> Any:
    return bpe_openai.get_encoding(name)


def completion_body(prompt: Prompt, response_id: str) -> dict[str, Any]:
    """The reference's 200 body, cut at max_tokens (finish_reason "length") as the service cuts it."""
    content: str | None = _describe(prompt) if prompt.response_format is None else _json_answer(prompt)
    completion_tokens = tokens.text_tokens(content or "", prompt.model)
    finish_reason: object = "stop"
    if content is not None and prompt.response_format is not None and TRUNCATE_MARKER in prompt.prompt_text:
        content = content[: len(content) // 2]
        completion_tokens, finish_reason = tokens.text_tokens(content, prompt.model), "length"
    if completion_tokens > prompt.max_tokens:
        encoding = _encoding(tokens.model_family(prompt.model).encoding)
        content = encoding.decode(encoding.encode(content)[: prompt.max_tokens])
        completion_tokens, finish_reason = prompt.max_tokens, "length"
    completion_filter: dict[str, Any] = dict(_SAFE)
    if COMPLETION_FILTER_MARKER in prompt.prompt_text:  # generated, billed, then withheld
        content, finish_reason = None, "content_filter"
        completion_filter["violence"] = {"filtered": True, "severity": "medium"}
    elif FINISH_OBJECT_MARKER in prompt.prompt_text and finish_reason == "stop":  # the reference's 2nd sample
        finish_reason = {"type": "stop", "stop": "<|fim_suffix|>"}
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if prompt.response_format is not None and REFUSE_MARKER in prompt.prompt_text:
        message = {
            "role": "assistant",
            "content": None,
            "refusal": "I'm sorry, I can't help with that request.",
        }
        completion_tokens = tokens.text_tokens(message["refusal"], prompt.model)
    choice = {
        "index": 0,
        "finish_reason": finish_reason,
        "message": message,
        "content_filter_results": completion_filter,
    }
    return {
        "id": response_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": prompt.model,
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": dict(_SAFE)}],
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt.prompt_tokens + completion_tokens,
        },
    }


def _json_answer(prompt: Prompt) -> str:
    """A JSON answer for a structured request: an object that holds to the request's schema (or, with
    BREAK_SCHEMA_MARKER, one that does not), the same for the same request."""
    rng = random.Random(prompt.seed)
    words = _describe(prompt).rstrip(".").split()
    spec = (prompt.response_format or {}).get("json_schema")
    if spec is None:  # json_object: any object
        value: Any = {"description": " ".join(words)}
    else:
        value = _sample(spec["schema"], spec["schema"], rng, words)
    if BREAK_SCHEMA_MARKER in prompt.prompt_text:
        value = {"unexpected": True} if spec is not None else ["not", "an", "object"]
    return json.dumps(value, ensure_ascii=False)


def _sample(node: Any, root: dict[str, Any], rng: random.Random, words: list[str]) -> Any:
    """A value of schema `node`: enums pick a member, strings take words of the description."""
    if not isinstance(node, dict):
        return None
    if isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
        target: Any = root
        for part in node["$ref"][2:].split("/"):
            target = target.get(part, {}) if isinstance(target, dict) else {}
        return _sample(target, root, rng, words)
    if "const" in node:
        return node["const"]
    if isinstance(node.get("enum"), list) and node["enum"]:
        return node["enum"][rng.randrange(len(node["enum"]))]
    if isinstance(node.get("anyOf"), list) and node["anyOf"]:
        options = [o for o in node["anyOf"] if not (isinstance(o, dict) and o.get("type") == "null")]
        return _sample((options or node["anyOf"])[0], root, rng, words)
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = node.get("properties") or {}
        return {name: _sample(child, root, rng, words) for name, child in properties.items()}
    if kind == "array":
        low, high = int(node.get("minItems", 1)), int(node.get("maxItems", 3))
        return [
            _sample(node.get("items") or {}, root, rng, words)
            for _ in range(rng.randint(low, max(low, high)))
        ]
    if kind == "integer":
        return rng.randint(int(node.get("minimum", 0)), int(node.get("maximum", 9)))
    if kind == "number":
        return round(rng.uniform(float(node.get("minimum", 0)), float(node.get("maximum", 1))), 3)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    start = rng.randrange(max(1, len(words) - 6))
    return " ".join(words[start : start + rng.randint(2, 6)])


def error_body(code: str, message: str, **extra: object) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def fault_body(status: int) -> dict[str, Any]:
    if status >= 500:
        return error_body("InternalServerError", _SERVER_500)
    return error_body(str(status), _PHRASES.get(status, f"HTTP {status}"))


def filtered_prompt_body() -> dict[str, Any]:
    """Azure's 400 for a prompt its content filter rejects."""
    result: dict[str, Any] = {**_SAFE, "violence": {"filtered": True, "severity": "high"}}
    inner = {"code": "ResponsibleAIPolicyViolation", "content_filter_result": result}
    return error_body(
        "content_filter", _FILTERED_400, type=None, param="prompt", status=400, innererror=inner
    )
