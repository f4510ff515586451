"""The light token counter counts exactly what the transformers CLIP tokenizer counts."""

from __future__ import annotations

from finetune.models.text import count_tokens
from finetune.models.tokenizers import clip_token_counter, load_clip_tokenizer

CAPTIONS = [
    "", "a photo of a cat", "A  Photo\tof\nTHE cat's hat, 1girl, (masterpiece:1.2), [blurry], <myDog>",
    "café naïve résumé 日本語 テスト 🐶🐱 emoji!!", "x" * 300, "<|endoftext|> hi <|startoftext|>",
    "don't we'll I'm they're 12345 3.14 e=mc^2 ###", " ".join(f"word{i}" for i in range(90)),
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ", "e\u0301 combining", "tab\u00a0nbsp\u2003emspace", "   leading and trailing   ",
]


def test_the_light_counter_matches_the_clip_tokenizer():
    count, tokenizer = clip_token_counter(), load_clip_tokenizer()
    assert [count(c) for c in CAPTIONS] == [count_tokens(tokenizer, c) for c in CAPTIONS]
    assert count("a photo of a cat") == 5
