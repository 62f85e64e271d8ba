"""`fl-diloco export`: a checkpoint loads in transformers as a LlamaForCausalLM that computes
the same logits, with a tokenizer that gives the same ids. The tests that load the export
need the optional `transformers`; the ones that read the written files do not."""

from __future__ import annotations

import json

import pytest
import torch

from fl_diloco.checkpoint import save_checkpoint
from fl_diloco.data import EOS_TOKEN, load_corpus
from fl_diloco.export import EXPORTED_FILES, export_to_hf, main
from fl_diloco.model import ModelConfig, Transformer, model_config
from tests.conftest import small_config


@pytest.fixture(scope="module")
def transformers():
    # fl_diloco.export itself does not need transformers; loading its output does.
    return pytest.importorskip("transformers", reason="loading the export needs the optional "
                                                      "`transformers` dependency")


TEXT = "HAMLET. To be, or not to be: that is the question.\n\n  Enter   Ghost — ‘ça va?’ 42"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = small_config(tmp_path_factory.mktemp("export-run"))
    return cfg, load_corpus(cfg.data_config())


def _model_config(kind: str, vocab_size: int, seq_len: int) -> ModelConfig:
    if kind == "untied":
        return model_config("tiny-1m", vocab_size=vocab_size, seq_len=seq_len)
    # The paper presets tie embed/head but are large; same flag on a small shape, with
    # non-default rope_theta / norm_eps so the config values are seen to carry over.
    return ModelConfig(vocab_size=vocab_size, seq_len=seq_len, n_layers=2, n_heads=4, d_model=64,
                       ffn_hidden=192, rope_theta=500000.0, norm_eps=1e-6, tie_embeddings=True)


@pytest.fixture(scope="module", params=["untied", "tied"])
def exported(request, run, tmp_path_factory):
    cfg, corpus = run
    model_cfg = _model_config(request.param, corpus.vocab_size, cfg.seq_len)
    torch.manual_seed(0)
    model = Transformer(model_cfg).eval()
    with torch.no_grad():
        # Non-unit norm weights, so a misplaced norm would change the logits.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.add_(0.2 * torch.randn_like(param))
    root = tmp_path_factory.mktemp(f"export-{request.param}")
    # As the server and the dp baseline save: named_parameters lists a tied matrix once.
    save_checkpoint(root / "checkpoint", dict(model.named_parameters()), cfg, model_cfg,
                    extra={"round": cfg.rounds})
    out_dir = export_to_hf(root / "checkpoint", root / "hf")
    return model, out_dir


def test_exported_files_and_config(exported):
    model, out_dir = exported
    cfg = model.cfg
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(EXPORTED_FILES)
    config = json.loads((out_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] == cfg.d_model
    assert config["intermediate_size"] == cfg.ffn_hidden
    assert config["num_attention_heads"] == config["num_key_value_heads"] == cfg.n_heads
    assert config["num_hidden_layers"] == cfg.n_layers
    assert config["vocab_size"] == cfg.vocab_size
    assert config["max_position_embeddings"] == cfg.seq_len
    assert config["rms_norm_eps"] == cfg.norm_eps
    assert config["rope_theta"] == cfg.rope_theta
    assert config["tie_word_embeddings"] is cfg.tie_embeddings

    transformers = pytest.importorskip("transformers")  # the files above need no transformers
    hf_config = transformers.AutoConfig.from_pretrained(out_dir)
    assert hf_config.rms_norm_eps == cfg.norm_eps
    assert hf_config.tie_word_embeddings is cfg.tie_embeddings
    assert hf_config.head_dim == cfg.head_dim


def test_transformers_model_computes_the_same_logits(exported, transformers):
    model, out_dir = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.dtype == torch.float32
    if model.cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    else:
        torch.testing.assert_close(hf.lm_head.weight, model.head.weight, rtol=0, atol=0)

    idx = torch.randint(0, model.cfg.vocab_size, (3, model.cfg.seq_len),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(input_ids=idx).logits
    max_diff = (ours - theirs).abs().max().item()
    assert max_diff < 1e-4, f"max |logit difference| = {max_diff:.3g}"


def test_tokenizer_files_pad_with_eos_and_set_no_length_limit(run, exported):
    _, corpus = run
    _, out_dir = exported
    tokenizer_config = json.loads((out_dir / "tokenizer_config.json").read_text())
    special = json.loads((out_dir / "special_tokens_map.json").read_text())
    assert tokenizer_config["pad_token"] == special["pad_token"] == EOS_TOKEN
    assert tokenizer_config["padding_side"] == "left"  # batched generation, decoder-only
    assert "model_max_length" not in tokenizer_config
    assert json.loads((out_dir / "config.json").read_text())["pad_token_id"] == corpus.eos_id


def test_tokenizer_round_trip(run, exported, transformers):
    _, corpus = run
    _, out_dir = exported
    tok = transformers.AutoTokenizer.from_pretrained(out_dir)
    ours = corpus.tokenizer.encode(TEXT, add_special_tokens=False).ids
    # Default call: no BOS / EOS may be added, as in training.
    assert tok(TEXT)["input_ids"] == ours
    assert tok.decode(ours) == TEXT
    assert tok.eos_token == EOS_TOKEN
    assert tok.eos_token_id == corpus.eos_id
    assert len(tok) == corpus.vocab_size
    batch = tok([TEXT, "To be"], padding=True)
    assert batch["input_ids"][1][0] == corpus.eos_id and batch["attention_mask"][1][0] == 0
    assert tok.model_max_length > 10 ** 6  # no warning when a text runs past seq_len


def test_cli_refuses_a_non_empty_out_dir_unless_overwrite(exported, capsys):
    _, out_dir = exported
    checkpoint = out_dir.parent / "checkpoint"
    before = (out_dir / "model.safetensors").stat().st_mtime_ns
    assert main([str(checkpoint), str(out_dir)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert (out_dir / "model.safetensors").stat().st_mtime_ns == before

    assert main([str(checkpoint), str(out_dir), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "model.safetensors" in printed and "AutoModelForCausalLM.from_pretrained" in printed
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(EXPORTED_FILES)


def test_out_dir_cannot_be_the_checkpoint(exported):
    _, out_dir = exported
    checkpoint = out_dir.parent / "checkpoint"
    with pytest.raises(ValueError, match="checkpoint directory itself"):
        export_to_hf(checkpoint, checkpoint, overwrite=True)


def test_missing_checkpoint_names_the_path(tmp_path):
    missing = tmp_path / "no-such-run" / "checkpoint"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        export_to_hf(missing, tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty / "model.safetensors")):
        export_to_hf(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()
