"""The model zoo: every Wan release the toolkit knows, with what a build and a sampler need to know.

Numbers come from the public Wan configs (see ``docs/models.md``). ``wan-tiny`` is the embedded default:
a random 2-layer model that needs no download, used by the README's main command and the tests.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from .errors import UnknownModelError, UnsupportedShapeError

#: Pixel sizes (width, height) per resolution name and aspect ratio, as TurboDiffusion/Wan use them.
RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "1:1": (640, 640), "4:3": (640, 480)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (960, 960), "4:3": (960, 720)},
    "704p": {"16:9": (1280, 704), "9:16": (704, 1280)},
    # wan-tiny's own size: small enough for a CPU, large enough that attention spans several blocks.
    "tiny": {"16:9": (160, 96), "9:16": (96, 160), "1:1": (128, 128)},
}


@dataclass(frozen=True)
class DiTConfig:
    """The DiT hyper-parameters, in diffusers' ``WanTransformer3DModel`` terms."""

    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_channels: int = 16
    out_channels: int = 16
    head_dim: int = 128
    text_dim: int = 4096
    freq_dim: int = 256
    image_dim: int | None = None  # CLIP image tokens (Wan2.1 I2V only)
    eps: float = 1e-6

    def diffusers_kwargs(self) -> dict:
        """Keyword arguments for ``WanTransformer3DModel(**kwargs)``."""
        return dict(
            patch_size=(1, 2, 2),
            num_attention_heads=self.num_heads,
            attention_head_dim=self.head_dim,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            text_dim=self.text_dim,
            freq_dim=self.freq_dim,
            ffn_dim=self.ffn_dim,
            num_layers=self.num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=self.eps,
            image_dim=self.image_dim,
            added_kv_proj_dim=self.dim if self.image_dim else None,
            rope_max_seq_len=1024,
            pos_embed_seq_len=None,
        )

    def num_params(self) -> int:
        """Parameter count of one expert (computed from the architecture, not from a checkpoint)."""
        d, f = self.dim, self.ffn_dim
        per_block = 8 * d * d + 2 * d * f + 21 * d + f
        if self.image_dim:
            per_block += 2 * d * d + 3 * d
        embed = self.in_channels * 4 * d + d  # patch embedding
        embed += self.text_dim * d + d + d * d + d  # text MLP
        embed += self.freq_dim * d + d + d * d + d  # time MLP
        embed += d * 6 * d + 6 * d  # time projection
        head = 2 * d + d * self.out_channels * 4 + self.out_channels * 4
        if self.image_dim:
            i = self.image_dim
            embed += 2 * i + i * i + i + i * d + d + 2 * d
        return self.num_layers * per_block + embed + head

    def block_linear_params(self) -> int:
        """Parameters in the Linear layers inside the blocks (those W8A8 quantizes)."""
        d, f = self.dim, self.ffn_dim
        per_block = 8 * d * d + 2 * d * f + (2 * d * d if self.image_dim else 0)
        return self.num_layers * per_block


@dataclass(frozen=True)
class ModelSpec:
    """One zoo entry."""

    id: str
    description: str
    dit: DiTConfig
    task: str  # "t2v" | "i2v" | "ti2v"
    experts: tuple[str, ...] = ("main",)
    boundary: float | None = None  # rectified-flow t at which high -> low noise expert switches
    resolutions: tuple[str, ...] = ("480p",)
    default_resolution: str = "480p"
    default_frames: int = 81
    fps: int = 16
    vae: str = "wan2.1"  # "wan2.1" | "wan2.2" | "tiny"
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    text_encoder: str = "umt5-xxl"  # "umt5-xxl" | "tiny"
    text_len: int = 512
    sigma_max: float = 80.0
    sample_shift: float = 5.0  # the original (UniPC) sampler's flow shift
    guide_scale: float = 5.0
    original_steps: int = 50
    embedded: bool = False  # weights generated, no checkpoint needed
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_moe(self) -> bool:
        return len(self.experts) > 1

    def pixel_size(self, resolution: str | None = None, aspect: str = "16:9") -> tuple[int, int]:
        res = resolution or self.default_resolution
        if res not in RESOLUTIONS or aspect not in RESOLUTIONS[res]:
            raise UnsupportedShapeError(
                f"resolution {res} {aspect} is not known; choose one of "
                + ", ".join(f"{r} {a}" for r in self.resolutions for a in RESOLUTIONS.get(r, {}))
            )
        return RESOLUTIONS[res][aspect]

    def latent_shape(self, width: int, height: int, frames: int) -> tuple[int, int, int, int]:
        """(channels, latent frames, latent height, latent width) for a pixel size and frame count."""
        st, sh, sw = self.vae_stride
        if (frames - 1) % st != 0 or frames < 1:
            raise UnsupportedShapeError(
                f"frames must be of the form {st}k+1 (e.g. 81, 49, 17), got {frames}"
            )
        if height % (sh * 2) or width % (sw * 2):
            raise UnsupportedShapeError(
                f"width and height must be multiples of {sw * 2} for {self.id}, got {width}x{height}"
            )
        return (self.dit.out_channels, (frames - 1) // st + 1, height // sh, width // sw)

    def num_tokens(self, width: int, height: int, frames: int) -> int:
        _, f, h, w = self.latent_shape(width, height, frames)
        return f * (h // 2) * (w // 2)


_T2V_13B = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30)
_14B = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)
_I2V_14B_21 = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_channels=36, image_dim=1280)
_I2V_14B_22 = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_channels=36)
_TI2V_5B = DiTConfig(dim=3072, ffn_dim=14336, num_heads=24, num_layers=30, in_channels=48, out_channels=48)
_TINY = DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, freq_dim=256)

MODELS: dict[str, ModelSpec] = {
    s.id: s
    for s in [
        ModelSpec("wan2.1-t2v-1.3b", "Wan2.1 text-to-video 1.3B", _T2V_13B, "t2v",
                  sigma_max=80.0, sample_shift=8.0, guide_scale=6.0),
        ModelSpec("wan2.1-t2v-14b", "Wan2.1 text-to-video 14B", _14B, "t2v",
                  resolutions=("480p", "720p"), default_resolution="720p", sigma_max=80.0),
        ModelSpec("wan2.1-i2v-14b-480p", "Wan2.1 image-to-video 14B, 480p weights", _I2V_14B_21, "i2v",
                  sigma_max=200.0, sample_shift=3.0, original_steps=40),
        ModelSpec("wan2.1-i2v-14b-720p", "Wan2.1 image-to-video 14B, 720p weights", _I2V_14B_21, "i2v",
                  resolutions=("480p", "720p"), default_resolution="720p", sigma_max=200.0,
                  original_steps=40),
        ModelSpec("wan2.2-t2v-a14b", "Wan2.2 text-to-video A14B (two experts)", _14B, "t2v",
                  experts=("high_noise", "low_noise"), boundary=0.875, resolutions=("480p", "720p"),
                  default_resolution="720p", sigma_max=80.0, sample_shift=12.0, guide_scale=4.0,
                  original_steps=40),
        ModelSpec("wan2.2-i2v-a14b", "Wan2.2 image-to-video A14B (two experts)", _I2V_14B_22, "i2v",
                  experts=("high_noise", "low_noise"), boundary=0.9, resolutions=("480p", "720p"),
                  default_resolution="720p", sigma_max=200.0, sample_shift=5.0, guide_scale=3.5,
                  original_steps=40),
        ModelSpec("wan2.2-ti2v-5b", "Wan2.2 text/image-to-video 5B", _TI2V_5B, "ti2v",
                  resolutions=("704p",), default_resolution="704p", default_frames=121, fps=24,
                  vae="wan2.2", vae_stride=(4, 16, 16), sigma_max=80.0),
        ModelSpec("wan-tiny", "tiny random Wan (2 layers, dim 256): the embedded default, no download",
                  _TINY, "t2v", resolutions=("tiny",), default_resolution="tiny", default_frames=17,
                  vae="tiny", text_encoder="tiny", text_len=32, embedded=True),
        ModelSpec("wan-tiny-i2v", "tiny random Wan I2V with two experts: the embedded I2V test model",
                  DiTConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, text_dim=64, in_channels=36),
                  "i2v", experts=("high_noise", "low_noise"), boundary=0.9, resolutions=("tiny",),
                  default_resolution="tiny", default_frames=17, vae="tiny", text_encoder="tiny",
                  text_len=32, sigma_max=200.0, embedded=True),
    ]
}


def get_model(model_id: str) -> ModelSpec:
    """Look up a zoo entry; unknown ids get the closest suggestion."""
    key = model_id.strip().lower()
    if key in MODELS:
        return MODELS[key]
    close = difflib.get_close_matches(key, list(MODELS), n=1, cutoff=0.3)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UnknownModelError(
        f"unknown model '{model_id}'{hint} (run `turbocompile models` for the list)"
    )


def weight_bytes(spec: ModelSpec, precision: str) -> int:
    """Bytes of one expert's weights when the block Linears are stored in ``precision``.

    Everything outside the block Linears stays in bf16 (that is what the W8A8 pass does); int8/fp8 also
    store one fp32 scale per 128x128 block.
    """
    total = spec.dit.num_params()
    lin = spec.dit.block_linear_params()
    if precision == "bf16":
        return 2 * total
    if precision in ("int8", "fp8"):
        return 2 * (total - lin) + lin + 4 * (lin // (128 * 128) + 1)
    if precision == "fp32":
        return 4 * total
    raise ValueError(f"unknown precision {precision}")
