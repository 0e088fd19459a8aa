"""The video pipeline around the engine: text encoder, I2V conditioning, sampler, VAE decode, .mp4."""
from .components import PipelineComponents, load_components, tiny_text_encoder, tiny_vae
from .conditioning import check_image_size, closest_size, i2v_condition, i2v_mask, load_image
from .generate import GenerateResult, generate
from .text_encoder import TextEncoder, convert_umt5_official_keys, load_tokenizer, load_umt5
from .vae import convert_wan_vae_keys, decode_latents, encode_video, load_vae
from .video import read_mp4, to_uint8_frames, write_mp4

__all__ = [
    "GenerateResult", "PipelineComponents", "TextEncoder", "check_image_size", "closest_size",
    "convert_umt5_official_keys", "convert_wan_vae_keys", "decode_latents", "encode_video", "generate",
    "i2v_condition", "i2v_mask", "load_components", "load_image", "load_tokenizer", "load_umt5", "load_vae",
    "read_mp4", "tiny_text_encoder", "tiny_vae", "to_uint8_frames", "write_mp4",
]
