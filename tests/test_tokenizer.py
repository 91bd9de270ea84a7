"""The offline CLIP tokenizer reproduces Stable Diffusion's token ids without any download."""

import pytest
from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTokenizer

from sdzero.backbones.tokenizer import offline_clip_tokenizer, write_clip_tokenizer

BOS, EOS = 49406, 49407
CAT_IDS = [BOS, 320, 1125, 539, 320, 2368, EOS]  # "a photo of a cat" under SD 1.x's tokenizer


def test_known_sd1_ids_and_vocabulary():
    tokenizer = offline_clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    assert tokenizer.convert_ids_to_tokens([0, 256, BOS, EOS]) == [
        "!",
        "!</w>",
        "<|startoftext|>",
        "<|endoftext|>",
    ]


def test_max_length_padding_with_endoftext():
    batch = offline_clip_tokenizer()("a photo of a cat", padding="max_length")
    assert len(batch.input_ids) == 77
    assert batch.input_ids == CAT_IDS + [EOS] * 70
    assert sum(batch.attention_mask) == 7


def test_truncation_keeps_the_end_token():
    ids = offline_clip_tokenizer()("cat " * 100, truncation=True).input_ids
    assert len(ids) == 77
    assert ids[0] == BOS and ids[-1] == EOS and set(ids[1:-1]) == {2368}


def test_rare_word_splits_into_known_subwords():
    tokenizer = offline_clip_tokenizer()
    assert tokenizer.tokenize("axolotl") == ["ax", "o", "lot", "l</w>"]
    assert tokenizer("axolotl").input_ids == [BOS, 3165, 78, 5132, 331, EOS]


@pytest.mark.parametrize(
    "text",
    [
        "A Photograph of an AXOLOTL!",
        "two  dogs, 3 cats & 42 birds",
        "don't stop-motion café",
    ],
)
def test_matches_open_clip_bpe_implementation(text):
    # open_clip's SimpleTokenizer is an independent BPE implementation over the same file.
    assert offline_clip_tokenizer()(text).input_ids == [BOS, *SimpleTokenizer().encode(text), EOS]


def test_decode_round_trip():
    tokenizer = offline_clip_tokenizer()
    text = "a photo of an axolotl and two dogs"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_sd2_pads_with_exclamation_mark_id_zero():
    tokenizer = offline_clip_tokenizer(pad_token="!")
    assert tokenizer.pad_token_id == 0
    ids = tokenizer("a photo of a cat", padding="max_length").input_ids
    assert ids == CAT_IDS + [0] * 70


def test_cached_per_arguments():
    assert offline_clip_tokenizer() is offline_clip_tokenizer()
    assert offline_clip_tokenizer(pad_token="!") is not offline_clip_tokenizer()
    assert offline_clip_tokenizer(model_max_length=16).model_max_length == 16


def test_written_folder_loads_with_from_pretrained(tmp_path):
    write_clip_tokenizer(tmp_path, pad_token="!")
    loaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.model_max_length == 77
    assert loaded.pad_token_id == 0
    assert loaded("a photo of a cat", padding="max_length").input_ids == CAT_IDS + [0] * 70


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match=r"pad_token='<pad>' is not in the CLIP vocabulary"):
        offline_clip_tokenizer(pad_token="<pad>")
    with pytest.raises(ValueError, match=r"model_max_length=1"):
        offline_clip_tokenizer(model_max_length=1)
