"""Tiny, offline builders for the components of diffusers pipelines (no network, no hub).

Every builder returns a real ``transformers`` / ``diffusers`` object made from a config alone,
with weights drawn from a fixed seed, so the full pipeline code path (tokenizers, text encoders,
transformer, scheduler, VAE) runs on a CPU in milliseconds. Used by
``flowalign.pipelines.testing`` (tiny pipelines for tests) and by the toy model
(``flowalign.pipelines.toy``), which trains such components.

Tokenizers:

* :func:`clip_tokenizer` is the *real* CLIP byte-level BPE (49,408 tokens), rebuilt from the
  vocabulary file that ``open-clip-torch`` ships (``bpe_simple_vocab_16e6.txt.gz``) the way
  open_clip's ``SimpleTokenizer`` builds its encoder, so it tokenizes plain text exactly like
  ``open_clip.tokenize`` (tested on captions). open_clip first cleans text with ``ftfy`` and
  unescapes HTML (``&amp;``, curly quotes, mojibake); this tokenizer, like ``CLIPTokenizer``
  without ``ftfy``, does not, so such text tokenizes differently.
* :func:`t5_tokenizer` is a ``T5Tokenizer`` (a ``tokenizers`` Unigram model, the same class the
  real T5 tokenizers use) over a small *character-level* vocabulary written here: pieces are
  the printable ASCII characters, with and without the SentencePiece word-start marker ``▁``.
  It is not the real T5 SentencePiece vocabulary (that file is not available offline); it
  splits text into characters, which is all a randomly initialised tiny T5 needs.
"""
from __future__ import annotations

import atexit
import contextlib
import gzip
import json
import logging
import string
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

CLIP_VOCAB_SIZE = 49408  # 256 bytes + 256 bytes+</w> + 48,894 merges + 2 special tokens
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Run a block with ``torch.manual_seed(seed)`` without touching the caller's RNG state (CPU and every CUDA
    device: manual_seed reseeds those too)."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_available() else []):
        torch.manual_seed(seed)
        yield


# ----------------------------------------------------------------------------- CLIP tokenizer


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """The reversible byte -> printable-unicode map of GPT-2 / CLIP byte-level BPE.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to code points 256...
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _open_clip_bpe_path() -> Path:
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - open-clip-torch is a dependency
        raise ImportError("clip_tokenizer needs open-clip-torch (it ships the CLIP BPE vocabulary)") from err
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE vocabulary is missing: {path}")
    return path


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """Rebuild CLIP's ``vocab.json`` (token -> id) and ``merges.txt`` lines from open_clip's file.

    Same construction as ``open_clip.tokenizer.SimpleTokenizer``: merges are lines
    ``[1 : 49152 - 256 - 2 + 1]`` of the file; the vocabulary is the 256 byte characters, the
    same with ``</w>``, one token per merged pair, then ``<|startoftext|>``, ``<|endoftext|>``.
    """
    lines = gzip.open(_open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [CLIP_BOS, CLIP_EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise RuntimeError(f"rebuilt CLIP vocabulary has {len(vocab)} tokens, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


@lru_cache(maxsize=1)
def clip_vocab_dir() -> Path:
    """A cached temporary folder holding ``vocab.json`` and ``merges.txt`` of the CLIP BPE.

    One folder per process, removed when the process exits (tokenizers read both files into
    memory when they are built, so nothing needs them afterwards).
    """
    vocab, merges = clip_vocab_and_merges()
    directory = Path(tempfile.mkdtemp(prefix="flowalign_clip_bpe_"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    logger.debug("wrote CLIP BPE files to %s", directory)
    return directory


def clip_tokenizer(model_max_length: int = 77, pad_token: str = CLIP_EOS):
    """The real CLIP BPE tokenizer as a ``transformers.CLIPTokenizer``, built offline.

    Args:
        model_max_length: context length (77 for every CLIP model; SD3 pads to it).
        pad_token: ``"<|endoftext|>"`` like SD3's ``tokenizer`` (CLIP-L), or ``"!"`` (id 0) like
            SD3's ``tokenizer_2`` (OpenCLIP bigG) and ``open_clip.tokenize``. transformers
            registers the pad token as a special token, so with ``"!"`` a literal ``!`` in a
            prompt becomes id 0 (open_clip gives ``!</w>``, 256); other text is unaffected.
    """
    from transformers import CLIPTokenizer

    directory = clip_vocab_dir()
    return CLIPTokenizer(
        vocab=str(directory / "vocab.json"),
        merges=str(directory / "merges.txt"),
        model_max_length=model_max_length,
        pad_token=pad_token,
    )


# ----------------------------------------------------------------------------- T5 tokenizer


@lru_cache(maxsize=1)
def _t5_char_vocab() -> tuple[tuple[str, float], ...]:
    """Unigram pieces: T5's special tokens (ids 0, 1, 2), ``▁``, then ``▁c`` and ``c`` per character."""
    chars = [c for c in string.printable if not c.isspace()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    # A word-start piece scores above the bare marker + a character, so "▁a" is one piece.
    pieces += [("▁" + c, -3.0) for c in chars]
    pieces += [(c, -3.0) for c in chars]
    return tuple(pieces)


def t5_tokenizer(model_max_length: int = 256):
    """A ``transformers.T5Tokenizer`` (Unigram) over a character vocabulary; no download.

    Ids 0/1/2 are ``<pad>``/``</s>``/``<unk>`` as in T5; each word becomes ``▁`` + its first
    character, then one piece per character; ``</s>`` ends every sequence. Vocabulary size is
    :func:`t5_vocab_size`. No sentinel (``<extra_id_*>``) tokens.
    """
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_t5_char_vocab()), extra_ids=0, model_max_length=model_max_length)


def t5_vocab_size() -> int:
    """Number of tokens of :func:`t5_tokenizer` (the T5 encoder's ``vocab_size`` must cover it)."""
    return len(_t5_char_vocab())


# ----------------------------------------------------------------------------- models


def tiny_clip_text_encoder(
    hidden_size: int = 32,
    projection_dim: int = 32,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    intermediate_size: int = 37,
    max_position_embeddings: int = 77,
    vocab_size: int = CLIP_VOCAB_SIZE,
    seed: int = 0,
):
    """A randomly initialised ``CLIPTextModelWithProjection`` sized for :func:`clip_tokenizer`.

    ``eos_token_id`` is the real ``<|endoftext|>`` id (49407), so the pooled output is read at
    the first end-of-text token whichever pad token the tokenizer uses.
    """
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        projection_dim=projection_dim,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_position_embeddings,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    with _seeded(seed):
        return CLIPTextModelWithProjection(config).eval()


def tiny_t5_encoder(
    d_model: int = 64,
    d_kv: int = 8,
    d_ff: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: Optional[int] = None,
    seed: int = 0,
):
    """A randomly initialised ``T5EncoderModel``; ``d_model`` must equal SD3's ``joint_attention_dim``."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size or t5_vocab_size(),
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    with _seeded(seed):
        return T5EncoderModel(config).eval()


def tiny_vae(
    block_out_channels: Sequence[int] = (8, 16),
    latent_channels: int = 4,
    layers_per_block: int = 1,
    norm_num_groups: int = 4,
    sample_size: int = 32,
    scaling_factor: float = 1.5035,
    shift_factor: float = 0.0609,
    seed: int = 0,
):
    """A randomly initialised ``AutoencoderKL`` (SD3 layout: no quant convs, shift + scale).

    Spatial downsampling is ``2 ** (len(block_out_channels) - 1)``. ``scaling_factor`` and
    ``shift_factor`` default to SD3's values.
    """
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    with _seeded(seed):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    return vae.eval()


def tiny_sd3_transformer(
    sample_size: int = 16,
    patch_size: int = 2,
    in_channels: int = 4,
    num_layers: int = 2,
    attention_head_dim: int = 8,
    num_attention_heads: int = 4,
    joint_attention_dim: int = 64,
    caption_projection_dim: int = 32,
    pooled_projection_dim: int = 64,
    pos_embed_max_size: Optional[int] = None,
    seed: int = 0,
):
    """A randomly initialised ``SD3Transformer2DModel`` (MMDiT).

    ``sample_size`` is the latent side; ``joint_attention_dim`` must equal the T5 ``d_model``
    (and be >= the sum of the two CLIP hidden sizes); ``pooled_projection_dim`` is the sum of
    the two CLIP projection sizes. ``caption_projection_dim`` must equal
    ``num_attention_heads * attention_head_dim`` (the inner dim).
    """
    from diffusers import SD3Transformer2DModel

    inner = num_attention_heads * attention_head_dim
    if caption_projection_dim != inner:
        raise ValueError(f"caption_projection_dim={caption_projection_dim} must equal heads*head_dim={inner}")
    with _seeded(seed):
        model = SD3Transformer2DModel(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            out_channels=in_channels,
            num_layers=num_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            caption_projection_dim=caption_projection_dim,
            pooled_projection_dim=pooled_projection_dim,
            pos_embed_max_size=pos_embed_max_size or max(sample_size // patch_size, 1) * 2,
        )
    return model.eval()
