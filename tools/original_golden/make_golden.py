"""Golden outputs from the ORIGINAL VARGPT-v1.1 code on weights written by our `save_pretrained`.

Runs OUTSIDE the project's environment (the original needs transformers 4.46.1); see README.md here.
The original is extracted from its git repository into a scratch folder and three documented source
edits are applied there (never to the repository): a switch for the bf16 cast in the decoder's
cross-attention, max(1, .) heads for the condition pooling at tiny widths, and overridable VAE widths.
Packages that cannot run here (flash_attn, timm, torchvision, the absent VARGPT-v1 package) are replaced
in `sys.modules` by small stand-ins defined below; flash_attn's varlen kernel by an exact SDPA equivalent.

    python make_golden.py --original-git DIR.git --weights CKPT --inputs OLD.safetensors --out NEW.safetensors
"""

from __future__ import annotations

import argparse
import importlib.machinery
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # the original's @torch.compile fused ops run eagerly

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

COMMIT = "8c67c263497a4f303b3e9668b49217d70bd47a44"
PKG = "visionllm.vargpt_qwen_v1_1"
SCHEDULE = [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 6, 6), (1, 8, 8)]  # the tiny 32 px schedule
SEED = 12345678  # the original's g_seed = int(time.time() * 1000) with time pinned to 12345.678


# ---------------------------------------------------------------- stand-ins for uninstallable packages
def varlen_kvpacked_attention(
    q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None, **_
):
    """flash_attn_varlen_kvpacked_func without CUDA: per packed sequence softmax(q k^T * scale) v in fp32."""
    outs = []
    for i in range(len(cu_seqlens_q) - 1):
        q_i = q[cu_seqlens_q[i] : cu_seqlens_q[i + 1]].float().transpose(0, 1)  # H Lq c
        k_i, v_i = kv[cu_seqlens_k[i] : cu_seqlens_k[i + 1]].float().unbind(1)
        o = F.scaled_dot_product_attention(q_i, k_i.transpose(0, 1), v_i.transpose(0, 1), scale=softmax_scale)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs).to(q.dtype)


def install_stand_ins() -> None:
    def module(name: str, **attrs) -> types.ModuleType:
        mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        mod.__path__ = []  # a package, so submodules resolve through sys.modules
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = mod
        return mod

    def unavailable(*_, **__):
        raise RuntimeError("not available in the golden harness")

    class DropPath(torch.nn.Identity):  # built only for drop_path > 0; the decoder uses 0
        def __init__(self, *_, **__):
            super().__init__()

    class SoftTargetCrossEntropy(torch.nn.Module):
        pass

    module(
        "flash_attn",
        flash_attn_varlen_kvpacked_func=varlen_kvpacked_attention,
        flash_attn_varlen_func=unavailable,
        flash_attn_func=unavailable,
    )
    module("timm")
    module("timm.models", register_model=lambda f: f)
    module("timm.models.layers", DropPath=DropPath, drop_path=unavailable)
    module("timm.loss", SoftTargetCrossEntropy=SoftTargetCrossEntropy)
    module("torchvision")
    module("torchvision.transforms", transforms=None)
    module("torchvision.transforms.functional", to_tensor=unavailable, resize=unavailable)
    module("torchvision.utils", make_grid=unavailable)
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    module("visionllm.vargpt")
    module("visionllm.vargpt.var_model")
    module(
        "visionllm.vargpt.var_model.models",
        VAR=None,
        VQVAE=None,
        build_vae_vargpt=unavailable,
        build_vae_vargpt_v1=unavailable,
    )
    module("visionllm.vargpt.var_model.models.helpers", sample_with_top_k_top_p_=unavailable)


# ---------------------------------------------------------------- the original, extracted and edited
EDITS = {
    "var_model/infinity/models/basic.py": [
        (
            "        if q_compact.dtype == torch.float32:",
            "        if q_compact.dtype == torch.float32 and os.environ.get('ORIG_CA_BF16', '1') == '1':",
        ),
    ],
    "var_model/infinity/models/infinity.py": [
        ("self.num_heads = Ct5 // self.head_dim", "self.num_heads = max(1, Ct5 // self.head_dim)"),
    ],
    "var_model/infinity/models/bsq_vae/vae.py": [
        ("        base_ch=128,", "        base_ch=HARNESS_VAE.get('base_ch', 128),"),
        ("        num_res_blocks=2,", "        num_res_blocks=HARNESS_VAE.get('num_res_blocks', 2),"),
        ("def vae_model(", "HARNESS_VAE = {}\n\n\ndef vae_model("),
    ],
}


def extract_original(git_dir: Path, scratch: Path) -> Path:
    archive = subprocess.run(
        ["git", f"--git-dir={git_dir}", "archive", COMMIT, "VARGPT-family-training/visionllm"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(scratch)], input=archive, check=True)
    root = scratch / "VARGPT-family-training"
    pkg = root / "visionllm" / "vargpt_qwen_v1_1"
    for rel, edits in EDITS.items():
        path = pkg / rel
        text = path.read_text()
        for old, new in edits:
            if text.count(old) != 1:
                raise RuntimeError(f"{rel}: expected one {old!r}, found {text.count(old)}")
            text = text.replace(old, new)
        path.write_text(text)
    return root


# ---------------------------------------------------------------- building the tiny original
def build_original(ckpt: Path):
    import json

    from visionllm.vargpt_qwen_v1_1 import modeling_vargpt_qwen2_vl as modeling
    from visionllm.vargpt_qwen_v1_1.configuration_vargpt_qwen2_vl import VARGPTQwen2VLConfig
    from visionllm.vargpt_qwen_v1_1.var_model.infinity.models.bsq_vae import vae as vae_module
    from visionllm.vargpt_qwen_v1_1.var_model.infinity.utils.dynamic_resolution import dynamic_resolution_h_w
    from visionllm.vargpt_qwen_v1_1.var_model.tools import run_infinity

    ours = json.loads((ckpt / "config.json").read_text())
    text, vision, dec = ours["text_config"], ours["vision_config"], ours["visual_decoder_config"]
    tok = ours["image_tokenizer_config"]
    for pn in ("0.25M", "1M"):  # VARGPT's training_pn and the 2D-RoPE reference grid
        dynamic_resolution_h_w[1.0][pn]["scales"] = list(SCHEDULE)

    vae_module.HARNESS_VAE.update(base_ch=tok["base_channels"], num_res_blocks=tok["num_res_blocks"])

    def tiny_vae(args):
        mult = tok["channel_multipliers"]
        return vae_module.vae_model(
            None,
            "dynamic",
            tok["bits"],
            2 ** tok["bits"],
            patch_size=2 ** len(mult) // 2,
            encoder_ch_mult=mult,
            decoder_ch_mult=mult,
            test_mode=True,
        )

    def tiny_decoder(vae, args):
        kwargs = dict(
            depth=dec["depth"],
            embed_dim=dec["embed_dim"],
            num_heads=dec["num_heads"],
            drop_path_rate=dec["drop_path_rate"],
            mlp_ratio=dec["mlp_ratio"],
            block_chunks=dec["num_block_chunks"],
        )
        return run_infinity.load_infinity_train(
            rope2d_each_sa_layer=1,
            rope2d_normalized_by_hw=2,
            use_scale_schedule_embedding=0,
            pn=args.pn,
            use_bit_label=1,
            add_lvl_embeding_only_first_block=1,
            vae=vae,
            device="cpu",
            model_kwargs=kwargs,
            text_channels=dec["context_dim"],
            apply_spatial_patchify=0,
            use_flex_attn=0,
            bf16=0,
        )

    modeling.load_visual_tokenizer = tiny_vae
    modeling.load_var_model = tiny_decoder
    config = VARGPTQwen2VLConfig(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text["num_key_value_heads"],
        rms_norm_eps=text["rms_norm_eps"],
        rope_theta=text["rope_parameters"]["rope_theta"],
        max_position_embeddings=text["max_position_embeddings"],
        rope_scaling={"type": "mrope", "mrope_section": text["rope_parameters"]["mrope_section"]},
        vision_config=dict(
            depth=vision["depth"],
            embed_dim=vision["embed_dim"],
            hidden_size=vision["hidden_size"],
            mlp_ratio=vision["mlp_ratio"],
            num_heads=vision["num_heads"],
            in_chans=3,
            patch_size=vision["patch_size"],
            spatial_merge_size=vision["spatial_merge_size"],
            temporal_patch_size=vision["temporal_patch_size"],
        ),
        image_token_id=ours["image_token_id"],
        video_token_id=ours["video_token_id"],
        vision_start_token_id=ours["vision_start_token_id"],
        vision_end_token_id=ours["vision_end_token_id"],
        special_tokens=ours["special_tokens"],
        bos_token_id=text["bos_token_id"],
        eos_token_id=text["eos_token_id"],
        pad_token_id=text["pad_token_id"],
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    config._attn_implementation = "sdpa"
    model = modeling.VARGPTQwen2VLForConditionalGeneration(config)
    state = {k: v.float() for k, v in load_file(ckpt / "model.safetensors").items()}
    model.load_state_dict(state, strict=True)
    model.float().eval()
    model.vargpt_gen.cond_drop_rate = 0.0
    model.vargpt_gen.rng = torch.Generator()
    return model, modeling


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--original-git", type=Path, required=True, help="bare git repository of VARGPT-v1.1")
    parser.add_argument("--weights", type=Path, required=True, help="checkpoint written by make_weights.py")
    parser.add_argument("--inputs", type=Path, required=True, help="safetensors holding the input tensors")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    scratch = Path(tempfile.mkdtemp(prefix="vargpt-original-"))
    sys.path.insert(0, str(extract_original(args.original_git, scratch)))
    import transformers.modeling_utils  # noqa: F401  (probes installed packages before the stand-ins exist)

    install_stand_ins()
    from golden_quantities import record_all

    model, modeling = build_original(args.weights)
    inputs = load_file(args.inputs)
    out = record_all(model, modeling, inputs)
    save_file({k: v.contiguous() for k, v in out.items()}, args.out)
    print(f"wrote {len(out)} tensors to {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
