"""The UMT5 text encoder (transformers ``UMT5EncoderModel``) with Wan's trimming, padding and a prompt cache.

Wan encodes a prompt with umT5-XXL, keeps only the valid tokens (the EOS included) and zero-pads them to
``text_len`` (512) so the DiT's text MLP sees zeros at the padding positions. Encoding a prompt alone
(no padding, batch 1) gives the same valid-token states as Wan's padded, masked batch: umT5's relative
position bias depends only on distances and the mask hides padded keys.

Weights come from the official ``models_t5_umt5-xxl-enc-bf16.pth`` (keys converted to transformers
names by :func:`convert_umt5_official_keys`) with a ``google/umt5-xxl`` tokenizer folder, or from a
diffusers ``text_encoder/`` + ``tokenizer/`` pair.
"""
from __future__ import annotations

import hashlib
import html
import logging
import re
from pathlib import Path

import torch

from ..errors import CheckpointError, InputError
from .files import component_folder, load_into, read_state_dict

log = logging.getLogger(__name__)


def clean_prompt(text: str) -> str:
    """Wan's ``clean='whitespace'``: unescape HTML entities (ftfy when installed) and collapse whitespace."""
    try:
        import ftfy  # optional, Wan uses it

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


# official T5Encoder (Wan) name -> transformers UMT5EncoderModel name, per block; {i} is the block index.
_UMT5_BLOCK_KEYS = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    # Wan: fc2(fc1(x) * gelu(gate(x))); transformers: wo(gelu(wi_0(x)) * wi_1(x))
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def convert_umt5_official_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official Wan umT5 encoder state dict to ``UMT5EncoderModel`` names (tensors unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif key.startswith("blocks."):
            _, idx, rest = key.split(".", 2)
            if rest not in _UMT5_BLOCK_KEYS:
                raise CheckpointError(f"unexpected key '{key}' in the umT5 checkpoint: is it the Wan umT5-XXL encoder?")
            out[f"encoder.block.{idx}.{_UMT5_BLOCK_KEYS[rest]}"] = value
        else:
            raise CheckpointError(f"unexpected key '{key}' in the umT5 checkpoint: is it the Wan umT5-XXL encoder?")
    return out


def umt5_config_from_official(state_dict: dict[str, torch.Tensor]):
    """A ``UMT5Config`` read off the tensor shapes of an official encoder checkpoint."""
    from transformers import UMT5Config

    try:
        vocab, d_model = state_dict["token_embedding.weight"].shape
        layers = 1 + max(int(k.split(".")[1]) for k in state_dict if k.startswith("blocks."))
        buckets, heads = state_dict["blocks.0.pos_embedding.embedding.weight"].shape
        d_ff = state_dict["blocks.0.ffn.fc1.weight"].shape[0]
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"not a Wan umT5 encoder checkpoint (missing {exc}); pass models_t5_umt5-xxl-enc-bf16.pth "
                              "to --text-encoder") from None
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, d_ff=d_ff, num_layers=layers,
                      num_heads=heads, relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, dropout_rate=0.0,
                      is_encoder_decoder=False, use_cache=False)


def load_umt5(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """``UMT5EncoderModel`` from the official ``.pth``, a ``.safetensors`` of either layout, or a diffusers/HF folder."""
    from transformers import UMT5EncoderModel

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"text encoder not found: {path}; pass the umT5 file or folder to --text-encoder")
    if path.is_dir():
        folder = component_folder(path, "text_encoder")
        if folder is None:
            raise CheckpointError(f"{path} has no config.json; pass a diffusers text_encoder/ folder or "
                                  "models_t5_umt5-xxl-enc-bf16.pth to --text-encoder")
        return UMT5EncoderModel.from_pretrained(folder, torch_dtype=dtype).eval().requires_grad_(False)
    sd = read_state_dict(path, "text encoder")
    if "shared.weight" in sd or "encoder.embed_tokens.weight" in sd:
        raise CheckpointError(f"{path} is in transformers layout; pass its folder (with config.json) to --text-encoder")
    config = umt5_config_from_official(sd)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    load_into(model, {k: v.to(dtype) for k, v in convert_umt5_official_keys(sd).items()}, path, "umT5 encoder",
              assign=True)
    model.encoder.embed_tokens = model.shared
    return model.eval().requires_grad_(False)


def load_tokenizer(path: str | Path):
    """The ``google/umt5-xxl`` tokenizer from a local folder (no download)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if not path.is_dir():
        raise CheckpointError(f"tokenizer folder not found: {path}; pass the google/umt5-xxl tokenizer folder to --tokenizer")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


class TextEncoder:
    """Prompt -> ``[1, text_len, dim]`` embeddings, trimmed to the valid tokens and zero-padded as Wan does.

    Results are cached by prompt in memory and, with ``cache_dir``, on disk as safetensors keyed by
    ``sha256(encoder_id + prompt)`` so a repeated prompt skips the (11 GB, for umT5-XXL) encoder.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, text_len: int, encoder_id: str,
                 cache_dir: str | Path | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.text_len, self.encoder_id = int(text_len), encoder_id
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._memory: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    def to(self, device: str | torch.device) -> "TextEncoder":
        self.model.to(device)
        return self

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def token_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(clean_prompt(prompt), add_special_tokens=True)["input_ids"])

    def cache_key(self, prompt: str) -> str:
        return hashlib.sha256(f"{self.encoder_id}\0{self.text_len}\0{prompt}".encode("utf-8")).hexdigest()

    def check_prompt(self, prompt: str) -> None:
        """Raise :class:`InputError` when the prompt has more tokens than the model's ``text_len``."""
        n = len(self.token_ids(prompt))
        if n > self.text_len:
            raise InputError(f"the prompt is {n} tokens (with the end token) but this model reads at most "
                             f"{self.text_len}; shorten it")

    def cached(self, prompt: str) -> torch.Tensor | None:
        """The cached embeddings of ``prompt`` (memory, then disk), or None: lets the caller skip moving the
        encoder to the GPU when every prompt is cached."""
        key = self.cache_key(prompt)
        if key not in self._memory:
            emb = self._load_disk(key)
            if emb is None:
                return None
            self._memory[key] = emb
        return self._memory[key]

    @torch.no_grad()
    def encode(self, prompt: str, truncate: bool = False) -> torch.Tensor:
        """``[1, text_len, dim]`` float32 embeddings on the CPU. ``truncate`` cuts a long prompt (Wan does
        that for the negative prompt) instead of raising :class:`InputError`."""
        key = self.cache_key(prompt)
        emb = self.cached(prompt)
        if emb is None:
            ids = self.token_ids(prompt)
            if len(ids) > self.text_len:
                if not truncate:
                    raise InputError(f"the prompt is {len(ids)} tokens (with the end token) but this model reads at most "
                                     f"{self.text_len}; shorten it")
                ids = ids[: self.text_len - 1] + [ids[-1]]
            ids_t = torch.tensor([ids], device=self.device)
            hidden = self.model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t)).last_hidden_state
            emb = torch.zeros(1, self.text_len, hidden.shape[-1], dtype=torch.float32)
            emb[:, : len(ids)] = hidden.float().cpu()
            self._save_disk(key, emb)
        self._memory[key] = emb
        return emb

    def _load_disk(self, key: str) -> torch.Tensor | None:
        if self.cache_dir is None:
            return None
        f = self.cache_dir / f"{key}.safetensors"
        if not f.exists():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(str(f))["emb"]
        except Exception:  # noqa: BLE001 - a corrupt cache entry is recomputed
            log.warning("ignoring unreadable prompt cache entry %s", f)
            return None

    def _save_disk(self, key: str, emb: torch.Tensor) -> None:
        if self.cache_dir is None:
            return
        from safetensors.torch import save_file

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.cache_dir / f".{key}.tmp"
        save_file({"emb": emb.contiguous()}, str(tmp))
        tmp.replace(self.cache_dir / f"{key}.safetensors")
