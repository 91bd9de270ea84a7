"""Offline CLIP tokenizer: the Stable Diffusion text tokenizer built from the BPE file that
open-clip-torch ships, so no hub download is ever needed.

The vocabulary is laid out as in OpenAI CLIP (49,408 entries): 256 byte-level characters, the same
with the end-of-word marker ``</w>``, one entry per BPE merge, then ``<|startoftext|>`` (49406) and
``<|endoftext|>`` (49407). SD 1.x pads with ``<|endoftext|>``; SD 2.x pads with ``"!"`` (id 0).
"""

from __future__ import annotations

import functools
import gzip
import json
import tempfile
from pathlib import Path

from open_clip.tokenizer import bytes_to_unicode, default_bpe
from transformers import CLIPTokenizer

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
# The BPE file holds more merges than CLIP uses; CLIP keeps the first 49152 - 256 - 2 of them.
_NUM_MERGES = 48894


@functools.cache
def _vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """CLIP's token -> id table and its merges (``"a b"`` strings, in priority order)."""
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # Line 0 is the file's version header, not a merge.
    merges = tuple(lines[1 : 1 + _NUM_MERGES])
    byte_chars = list(bytes_to_unicode().values())
    tokens = [
        *byte_chars,
        *(c + "</w>" for c in byte_chars),
        *(m.replace(" ", "") for m in merges),
        BOS_TOKEN,
        EOS_TOKEN,
    ]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_clip_tokenizer(
    folder: str | Path, pad_token: str = EOS_TOKEN, model_max_length: int = 77
) -> Path:
    """Write ``vocab.json``, ``merges.txt`` and ``tokenizer_config.json`` into ``folder`` so that
    ``CLIPTokenizer.from_pretrained(folder)`` loads the SD tokenizer (used when saving pipelines).

    ``pad_token`` must be a vocabulary entry (``"<|endoftext|>"`` for SD 1.x, ``"!"`` for SD 2.x).
    Returns the folder.
    """
    vocab, merges = _vocab_and_merges()
    if pad_token not in vocab:
        raise ValueError(
            f"pad_token={pad_token!r} is not in the CLIP vocabulary; expected an existing token "
            f"such as {EOS_TOKEN!r} (SD 1.x) or '!' (SD 2.x)"
        )
    if model_max_length < 2:
        raise ValueError(
            f"model_max_length={model_max_length} leaves no room for text between the start and "
            "end tokens; expected at least 2 (SD uses 77)"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8"
    )
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


@functools.cache
def offline_clip_tokenizer(pad_token: str = EOS_TOKEN, model_max_length: int = 77) -> CLIPTokenizer:
    """The SD text tokenizer, built offline; cached per argument pair, so treat it as read-only.

    "a photo of a cat" -> ``[49406, 320, 1125, 539, 320, 2368, 49407]``, padded with the id of
    ``pad_token`` up to ``model_max_length`` under ``padding="max_length"``.
    """
    # Loading written files rather than passing vocab/merges to the constructor: transformers 5
    # silently ignores ``vocab_file=``/``merges_file=`` and 4.x lacks ``vocab=``/``merges=``, while
    # ``from_pretrained`` on a folder behaves the same in both.
    with tempfile.TemporaryDirectory(prefix="sdzero-clip-tokenizer-") as folder:
        write_clip_tokenizer(folder, pad_token=pad_token, model_max_length=model_max_length)
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
