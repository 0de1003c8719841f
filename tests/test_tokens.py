import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.tokens import count_prompt_tokens, image_tokens, max_image_tokens, text_tokens, viewed_size


@pytest.mark.parametrize(
    ("width", "height", "detail", "tokens"),
    [
        (1024, 1024, "high", 765),  # published
        (2048, 4096, "high", 1105),  # published
        (4096, 8192, "low", 85),  # published
        (640, 480, "high", 425),  # published: no upscaling
        (1, 1, "high", 255),
        (512, 512, "high", 255),
        (513, 513, "high", 765),
        (600, 900, "auto", 765),  # auto counts as high
        (1, 4000, "high", 765),
        (10000, 20, "high", 765),
    ],
)
def test_image_tokens_match_the_published_rule(width, height, detail, tokens):
    assert image_tokens(width, height, detail) == tokens


def test_an_image_smaller_than_768_on_its_short_side_is_not_upscaled():
    assert viewed_size(700, 500, "high") == (700, 500)


def test_gpt4o_mini_bills_images_at_its_own_rate():
    assert image_tokens(1024, 1024, "high", "gpt-4o-mini") == 2833 + 4 * 5667


@given(w=st.integers(1, 20_000), h=st.integers(1, 20_000))
def test_low_detail_is_flat_and_high_detail_never_cheaper(w, h):
    low, high = image_tokens(w, h, "low"), image_tokens(w, h, "high")

    assert low == 85
    assert low < high <= max_image_tokens("high")


@given(w=st.integers(1, 20_000), h=st.integers(1, 20_000), detail=st.sampled_from(["low", "high", "auto"]))
def test_the_viewed_size_bills_the_same_as_the_original(w, h, detail):
    """Downscaling an image to what the model sees must not change its bill."""
    vw, vh = viewed_size(w, h, detail)

    assert image_tokens(vw, vh, detail) == image_tokens(w, h, detail)
    assert viewed_size(vw, vh, detail) == (vw, vh)


def test_prompt_tokens_add_text_overhead_and_images():
    messages = [
        {"role": "system", "content": "You are a careful image captioner."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe this picture:"},
                {"type": "image_url", "image_url": {"url": "data:...", "detail": "high"}},
            ],
        },
    ]

    total = count_prompt_tokens(messages, [(1024, 1024)])

    text = text_tokens("You are a careful image captioner.") + text_tokens("Describe this picture:")
    overhead = 3 + 2 * (3 + 1)  # reply priming, and per message 3 plus a one-token role
    assert total == text + overhead + 765


def test_an_image_of_unknown_size_counts_at_its_most():
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://x", "detail": "low"}}],
        }
    ]

    assert (
        count_prompt_tokens(messages, [None]) - count_prompt_tokens([{"role": "user", "content": []}], [])
        == 85
    )


def test_image_sizes_must_match_image_parts():
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}]

    with pytest.raises(ValueError):
        count_prompt_tokens(messages, [])


def test_text_that_looks_like_a_special_token_is_counted_as_plain_text():
    assert text_tokens("<|endoftext|>") > 1


TEXTS = [
    "",
    "Describe this image in one paragraph.",
    "<|endoftext|><|fim_prefix|> looks special, is text",
    "Ünïcödé, 日本語の説明, emoji 🦜🦜 and\ttabs\r\n\n   runs of spaces   ",
    "x" * 5000,
    "word " * 3000,
]


@pytest.mark.parametrize("model", ["gpt-4-turbo", "gpt-4o"])
def test_text_tokens_count_as_bpe_openai_s_public_api_does(model):
    import bpe_openai

    from pipeline.tokens import model_family

    encoding = bpe_openai.get_encoding(model_family(model).encoding)
    for text in TEXTS:
        assert text_tokens(text, model) == len(encoding.encode(text, disallowed_special=())), text[:40]


@given(st.text(max_size=300))
def test_any_text_counts_as_the_public_api_does(text):
    import bpe_openai

    assert text_tokens(text) == len(
        bpe_openai.get_encoding("cl100k_base").encode(text, disallowed_special=())
    )


def test_counting_tokens_does_not_import_bpe_openai_and_its_tables():
    code = (
        "import sys; from pipeline.tokens import text_tokens; n = text_tokens('a photo of a parrot'); "
        "print(n, 'bpe_openai' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["6", "False"]  # a, photo, of, a, par, rot
