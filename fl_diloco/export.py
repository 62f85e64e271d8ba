"""Export a checkpoint as a Hugging Face `transformers` Llama model plus its tokenizer.

    fl-diloco export runs/diloco-.../checkpoint hf-model/
    # then, with `transformers` installed:
    #   AutoModelForCausalLM.from_pretrained("hf-model")   -> LlamaForCausalLM
    #   AutoTokenizer.from_pretrained("hf-model")          -> PreTrainedTokenizerFast

Our `Transformer` computes the same function as `LlamaForCausalLM`, so the export is a
renaming of tensors plus a config. What was checked against transformers' Llama code
(tests/test_export.py compares the logits of both models):

* RoPE: `apply_rotary` pairs coordinate i with i + head_dim/2 ("split halves"), which is
  Llama's `rotate_half` layout, with the same frequencies theta^(-2k/head_dim). So the
  q/k projection rows are copied as they are; no interleaved-to-halves permutation.
* RMSNorm: x * rsqrt(mean(x^2) + eps) * weight in both, eps inside the square root.
* SwiGLU: w2(silu(w1 x) * w3 x) == down_proj(silu(gate_proj x) * up_proj x), so
  w1 -> gate_proj, w3 -> up_proj, w2 -> down_proj.
* Attention: SDPA's default scale 1/sqrt(head_dim) is Llama's `scaling`; no GQA
  (num_key_value_heads == num_attention_heads); no biases anywhere.

Writing the files needs only torch, safetensors and tokenizers; `transformers` is needed
to load the result, not to produce it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from fl_diloco.atomic import atomic_write
from fl_diloco.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_checkpoint
from fl_diloco.config import RunConfig
from fl_diloco.data import EOS_TOKEN, load_corpus
from fl_diloco.model import ModelConfig, Transformer

HF_CONFIG_NAME = "config.json"
HF_WEIGHTS_NAME = "model.safetensors"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
SPECIAL_TOKENS_NAME = "special_tokens_map.json"
EXPORTED_FILES = (HF_CONFIG_NAME, HF_WEIGHTS_NAME, GENERATION_CONFIG_NAME, TOKENIZER_NAME,
                  TOKENIZER_CONFIG_NAME, SPECIAL_TOKENS_NAME)

# Our name (after "blocks.{i}.") -> Llama's name (after "model.layers.{i}.").
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w1.weight": "mlp.gate_proj.weight",
    "mlp.w3.weight": "mlp.up_proj.weight",
    "mlp.w2.weight": "mlp.down_proj.weight",
}
_OTHER_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}


def hf_parameter_name(name: str) -> str:
    """Llama's state_dict name for one of our parameter names (KeyError if unknown)."""
    if name in _OTHER_NAMES:
        return _OTHER_NAMES[name]
    prefix, _, rest = name.partition(".")
    index, _, suffix = rest.partition(".")
    if prefix == "blocks" and index.isdigit() and suffix in _BLOCK_NAMES:
        return f"model.layers.{index}.{_BLOCK_NAMES[suffix]}"
    raise KeyError(f"no Hugging Face Llama name for parameter {name!r}")


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's weights under Llama's names, fp32 and contiguous.

    A tied model writes its one embedding/head matrix once, as the embedding;
    `tie_word_embeddings` in config.json makes transformers share it with `lm_head`.
    """
    tied = model.cfg.tie_embeddings
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "head.weight":
            continue
        out[hf_parameter_name(name)] = tensor.detach().to("cpu", torch.float32).contiguous()
    return out


def hf_config(cfg: ModelConfig, eos_id: int) -> dict[str, Any]:
    """config.json for `LlamaConfig`, every value taken from our ModelConfig.

    Both the transformers 4.x spellings (`rope_theta`, `torch_dtype`) and the 5.x ones
    (`rope_parameters`, `dtype`) are written so either major version reads the file.
    Our tokenizer has no BOS token; documents are separated by EOS, so EOS doubles as BOS
    (the GPT-2 convention).
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_hidden,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _tokenizer_configs(eos_id: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """tokenizer_config.json and special_tokens_map.json for PreTrainedTokenizerFast.

    The vocabulary has no padding token, so EOS pads (masked out by the attention mask),
    on the left, where batched generation with a decoder-only model needs it. No
    `model_max_length`: rotary positions run past the training length (config.json's
    max_position_embeddings says what it was), and a limit there only makes transformers
    warn about indexing errors that cannot happen.
    """
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "padding_side": "left",
        # Byte-level BPE decodes exactly; the default clean-up would drop spaces before
        # punctuation (" ." -> ".").
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(eos_id): {
                "content": EOS_TOKEN, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False, "special": True,
            }
        },
    }
    special_tokens_map = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    return tokenizer_config, special_tokens_map


def _load_tokenizer(run_config: RunConfig, checkpoint_dir: Path):
    """The run's tokenizer, from the corpus cache (rebuilt from the source if missing)."""
    try:
        corpus = load_corpus(run_config.data_config())
    except Exception as err:
        raise ValueError(
            f"could not load the tokenizer of checkpoint {checkpoint_dir}: it is rebuilt from "
            f"the run's corpus (data_source={run_config.data_source!r}, "
            f"vocab_size={run_config.vocab_size}), which failed: {err}"
        ) from err
    return corpus.tokenizer, corpus.eos_id


def _check_paths(checkpoint_dir: Path, out_dir: Path, overwrite: bool) -> None:
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (checkpoint_dir / name).is_file():
            hint = ""
            if (checkpoint_dir / "checkpoint" / name).is_file():
                hint = f" (did you mean {checkpoint_dir / 'checkpoint'}?)"
            raise FileNotFoundError(
                f"{checkpoint_dir / name} not found: {checkpoint_dir} is not an fl-diloco "
                f"checkpoint{hint}"
            )
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"output path {out_dir} exists and is not a directory")
        # The export's file names are the checkpoint's own: never write over the source.
        if out_dir.resolve() == checkpoint_dir.resolve():
            raise ValueError(f"output directory {out_dir} is the checkpoint directory itself")
        if not overwrite and any(out_dir.iterdir()):
            raise FileExistsError(
                f"output directory {out_dir} exists and is not empty; choose another one or "
                "pass --overwrite (overwrite=True) to replace the exported files in it"
            )


def _write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))


def export_to_hf(checkpoint_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the checkpoint in `checkpoint_dir` to `out_dir` as a transformers Llama model.

    Files written (`EXPORTED_FILES`): config.json, model.safetensors,
    generation_config.json, tokenizer.json, tokenizer_config.json and
    special_tokens_map.json, each atomically (config.json last).

    Raises:
        FileNotFoundError: `checkpoint_dir` or one of its files is missing.
        FileExistsError: `out_dir` is a non-empty directory and `overwrite` is False
            (with `overwrite`, those six files are replaced and others left alone), or
            `out_dir` is a file.
        ValueError: the checkpoint is unreadable, `out_dir` is the checkpoint directory,
            or the run's tokenizer cannot be rebuilt or does not fit the model.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    _check_paths(checkpoint_dir, out_dir, overwrite)
    model, run_config = load_checkpoint(checkpoint_dir)
    cfg = model.cfg
    tokenizer, eos_id = _load_tokenizer(run_config, checkpoint_dir)
    if tokenizer.get_vocab_size() != cfg.vocab_size:
        raise ValueError(
            f"the run's tokenizer has {tokenizer.get_vocab_size()} tokens but the model in "
            f"{checkpoint_dir} has vocab_size={cfg.vocab_size}; was the corpus changed?"
        )

    tensors = hf_state_dict(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    # metadata format=pt: transformers checks it to know how the tensors were saved.
    atomic_write(out_dir / HF_WEIGHTS_NAME,
                 lambda fh: fh.write(save(tensors, metadata={"format": "pt"})))
    tokenizer_json = tokenizer.to_str()
    atomic_write(out_dir / TOKENIZER_NAME, lambda fh: fh.write(tokenizer_json.encode()))
    tokenizer_config, special_tokens_map = _tokenizer_configs(eos_id)
    _write_json(out_dir / TOKENIZER_CONFIG_NAME, tokenizer_config)
    _write_json(out_dir / SPECIAL_TOKENS_NAME, special_tokens_map)
    _write_json(out_dir / GENERATION_CONFIG_NAME,
                {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id})
    # Last: a directory with config.json holds a complete export.
    _write_json(out_dir / HF_CONFIG_NAME, hf_config(cfg, eos_id))
    return out_dir


USAGE = "fl-diloco export CHECKPOINT OUT_DIR [--overwrite]"


def main(argv: list[str] | None = None) -> int:
    """`fl-diloco export CHECKPOINT OUT_DIR [--overwrite]`; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="fl-diloco export",
        description="Export an fl-diloco checkpoint as a Hugging Face transformers "
                    "LlamaForCausalLM model with its tokenizer.",
    )
    parser.add_argument("checkpoint", type=Path,
                        help="checkpoint directory (e.g. runs/<run>/checkpoint)")
    parser.add_argument("out_dir", type=Path, help="directory to write the model to")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into OUT_DIR even if it is not empty")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out_dir = export_to_hf(args.checkpoint, args.out_dir, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out_dir}:")
    for name in EXPORTED_FILES:
        print(f"  {name:<24} {(out_dir / name).stat().st_size:>12,} bytes")
    print(f'load with AutoModelForCausalLM.from_pretrained("{out_dir}") and '
          f'AutoTokenizer.from_pretrained("{out_dir}") (pip install transformers)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
