"""GGUF -> Hugging Face fp16 conversion (sparsezip.convert.gguf).

A tiny random Hugging Face model is written as a GGUF here, the way llama.cpp's converter does it
(GGUF names, reversed shapes, q/k rows interleaved for llama, norms in F32, weights in F16 or Q8_0),
so the expected values come from the source model and from independent decoders, never from the
code under test.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from sparsezip.convert.gguf import convert_gguf  # noqa: E402
from sparsezip.errors import SparsezipError  # noqa: E402

# The GGUF carries a chat template of its own; the converted folder must keep it.
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"

FAMILIES = ("llama", "qwen2", "qwen3")
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
Q8_0_TENSORS = ("k_proj", "up_proj", "embed_tokens")  # the rest of the matrices are F16, vectors F32


def gguf_name(hf: str) -> str:
    if hf in TOP_NAMES:
        return TOP_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def storage_type(hf: str, t: torch.Tensor) -> Q:
    if t.dim() == 1:
        return Q.F32
    return Q.Q8_0 if any(k in hf for k in Q8_0_TENSORS) else Q.F16


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf LlamaModel.permute: the q/k row order its rotary kernel wants."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def heads_of(config: dict, hf: str) -> int:
    return config["num_attention_heads"] if "q_proj" in hf else config["num_key_value_heads"]


def rope_theta(config: dict) -> float:
    return config.get("rope_theta") or config["rope_parameters"]["rope_theta"]


def write_gguf(model_dir: Path, path: Path, arch: str) -> Path:
    """Export a tiny Hugging Face model as llama.cpp would, with F32, F16 and Q8_0 tensors."""
    config = json.loads((model_dir / "config.json").read_text())
    state = load_file(model_dir / "model.safetensors")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(hidden)
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(rope_theta(config))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t["content"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_chat_template(CHAT_TEMPLATE)
    for hf, t in state.items():
        a = t.float().numpy()
        if arch == "llama" and ("q_proj" in hf or "k_proj" in hf):
            a = llama_cpp_permute(a, heads_of(config, hf))
        qtype = storage_type(hf, t)
        if qtype == Q.Q8_0:
            w.add_tensor(gguf_name(hf), gguf.quants.quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            w.add_tensor(gguf_name(hf), a.astype(np.float32 if qtype == Q.F32 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def q8_0_decode(raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Q8_0 by its definition (per 32 values: an fp16 scale, then 32 int8), independent of gguf.quants."""
    blocks = np.ascontiguousarray(raw).reshape(-1, 34)
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    return (scale * blocks[:, 2:].copy().view(np.int8).astype(np.float32)).reshape(shape)


def inverse_llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama_cpp_permute by inverting the row order it produces (not the formula under test)."""
    order = llama_cpp_permute(np.arange(w.shape[0])[:, None], n_head)[:, 0]
    return w[np.argsort(order)]


@pytest.fixture(scope="module")
def tiny_gguf(tiny_dir, tmp_path_factory):
    """family -> (source Hugging Face folder, GGUF path), built once per module."""
    built: dict[str, tuple[Path, Path]] = {}

    def build(family: str) -> tuple[Path, Path]:
        if family not in built:
            src = tiny_dir(family)
            built[family] = src, write_gguf(src, tmp_path_factory.mktemp(f"gguf-{family}") / "tiny.gguf", family)
        return built[family]

    return build


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    done: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in done:
            _, path = tiny_gguf(family)
            done[family] = convert_gguf([path], tmp_path_factory.mktemp(f"conv-{family}") / "out")
        return done[family]

    return build


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("family", FAMILIES)
def test_names_shapes_and_config_match_source(family, tiny_gguf, converted):
    src, _ = tiny_gguf(family)
    out = converted(family)
    want, got = load_file(src / "model.safetensors"), load_file(out / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in want.items()}
    assert all(v.dtype == torch.float16 for v in got.values())
    cfg, ref = json.loads((out / "config.json").read_text()), json.loads((src / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "float16" and "quantization_config" not in cfg
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "tie_word_embeddings", "max_position_embeddings"):
        assert cfg[key] == ref[key], key
    assert cfg.get("head_dim", 16) == ref.get("head_dim", 16)
    assert cfg["architectures"] == ref["architectures"]
    assert rope_theta(cfg) == rope_theta(ref)
    assert cfg["rms_norm_eps"] == pytest.approx(ref["rms_norm_eps"], rel=1e-6)
    assert ("lm_head.weight" in got) == (not ref["tie_word_embeddings"])
    assert leftovers(out) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_values_equal_source_and_independent_dequantization(family, tiny_gguf, converted):
    """F16/F32 tensors equal the source model bit for bit (llama's q/k through the permutation and back);
    Q8_0 tensors equal the stored blocks decoded by Q8_0's definition, read with gguf's own reader."""
    src, path = tiny_gguf(family)
    config = json.loads((src / "config.json").read_text())
    want, got = load_file(src / "model.safetensors"), load_file(converted(family) / "model.safetensors")
    stored = {t.name: t for t in gguf.GGUFReader(path).tensors}
    n_q8 = 0
    for hf, ref in want.items():
        if storage_type(hf, ref) != Q.Q8_0:
            assert torch.equal(got[hf].view(torch.int16), ref.view(torch.int16)), hf
            continue
        n_q8 += 1
        expected = q8_0_decode(stored[gguf_name(hf)].data, tuple(ref.shape))
        if family == "llama" and "k_proj" in hf:
            expected = inverse_llama_permute(expected, heads_of(config, hf))
        np.testing.assert_array_equal(got[hf].numpy(), expected.astype(np.float16), err_msg=hf)
        # and the quantization error is what Q8_0 allows: at most half a step of each block's scale
        assert (got[hf].float() - ref.float()).abs().max() <= ref.float().abs().max() / 127 + 1e-3
    assert n_q8 >= 3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_matches_transformers_gguf_loader(family, tiny_gguf, converted):
    """Every tensor and the logits equal transformers' own GGUF import of the same file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path = tiny_gguf(family)
    out = converted(family)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float16)
    got = load_file(out / "model.safetensors")
    # a tied model's lm_head is the embedding; the folder has none, as save_pretrained would do
    ref_state = {k: v for k, v in ref.state_dict().items() if k in got or k != "lm_head.weight"}
    assert sorted(ref_state) == sorted(got)
    for name, tensor in ref_state.items():
        assert torch.equal(got[name].view(torch.int16), tensor.view(torch.int16)), name

    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref.hf_quantizer, ref.is_quantized = None, False  # it holds plain fp16 tensors; let it be cast
    ref = ref.float().eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)

    tok = AutoTokenizer.from_pretrained(out)
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = "It is a truth universally acknowledged, that a single man"
    assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert tok.chat_template == CHAT_TEMPLATE and tok.eos_token == "<|im_end|>"
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")


def test_split_parts_give_the_same_bytes(tiny_gguf, converted, tmp_path):
    """Three byte ranges of one GGUF (the first cut inside the header) convert to the same files."""
    _, path = tiny_gguf("llama")
    whole = converted("llama")
    data = path.read_bytes()
    cuts = [0, 700, len(data) * 2 // 3, len(data)]
    parts = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(data[a:b])
    out = convert_gguf(parts, tmp_path / "out")
    names = sorted(p.name for p in whole.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        assert (out / name).read_bytes() == (whole / name).read_bytes(), name


def test_sharded_output_with_index(tiny_gguf, tmp_path):
    _, path = tiny_gguf("qwen2")
    out = convert_gguf([path], tmp_path / "out", part_file_size=40_000 / 2**30)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    merged = {}
    for s in shards:
        merged.update(load_file(out / s))
    assert sorted(merged) == sorted(index["weight_map"])


def assert_refused(sources: list[Path], out: Path, match: str) -> None:
    with pytest.raises(SparsezipError, match=match) as err:
        convert_gguf(sources, out)
    assert "\n" not in str(err.value)
    assert not out.exists()
    assert leftovers(out.parent) == []


@pytest.mark.parametrize("size", [0, -1, float("inf"), float("nan")])
def test_a_shard_size_that_is_no_positive_number_is_refused(size, tiny_gguf, tmp_path):
    _, path = tiny_gguf("llama")
    with pytest.raises(SparsezipError, match="--part_file_size must be a positive number of GB"):
        convert_gguf([path], tmp_path / "out", part_file_size=size)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("keep", [500, -100])
def test_truncated_gguf_is_refused(keep, tiny_gguf, tmp_path):
    """Cut inside the header, or a few bytes short of the last tensor."""
    _, path = tiny_gguf("llama")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:keep])
    assert_refused([cut], tmp_path / "out", "truncated")


def test_parts_out_of_order_are_refused(tiny_gguf, tmp_path):
    _, path = tiny_gguf("llama")
    data = path.read_bytes()
    (tmp_path / "a").write_bytes(data[: len(data) // 2])
    (tmp_path / "b").write_bytes(data[len(data) // 2:])
    assert_refused([tmp_path / "b", tmp_path / "a"], tmp_path / "out", "GGUF magic")


@pytest.mark.parametrize("raw_type, match", [(99, "GGML type 99"), (int(Q.Q8_1), "Q8_1")])
def test_unsupported_tensor_type_is_refused(raw_type, match, tiny_gguf, tmp_path):
    """A type gguf does not know, and one it knows but cannot dequantize, patched into the tensor table."""
    _, path = tiny_gguf("llama")
    reader = gguf.GGUFReader(path)
    target = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
    type_at = target.field.offset + sum(int(p.nbytes) for p in target.field.parts[:4])
    data = bytearray(path.read_bytes())
    assert int.from_bytes(data[type_at: type_at + 4], "little") == int(Q.F32)
    data[type_at: type_at + 4] = raw_type.to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data)
    assert_refused([bad], tmp_path / "out", f"blk.0.attn_norm.weight.*{match}")


def test_existing_output_is_kept_unless_overwrite(tiny_gguf, tmp_path):
    _, path = tiny_gguf("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(SparsezipError, match="already exists"):
        convert_gguf([path], out)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and leftovers(tmp_path) == []
    convert_gguf([path], out, overwrite=True)
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists()
    assert leftovers(tmp_path) == []


def test_failure_midway_leaves_nothing(tiny_gguf, tmp_path, monkeypatch):
    import sparsezip.convert.gguf as mod

    _, path = tiny_gguf("llama")
    calls = []

    def failing(raw, qtype):
        calls.append(qtype)
        if len(calls) > 5:
            raise RuntimeError("disk on fire")
        return gguf.quants.dequantize(raw, qtype)

    monkeypatch.setattr(mod, "dequantize", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_gguf([path], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_missing_input_is_refused(tmp_path):
    assert_refused([tmp_path / "nope.gguf"], tmp_path / "out", "does not exist")


def test_command_line(tiny_gguf, tmp_path, capsys):
    from sparsezip.cli import main

    _, path = tiny_gguf("qwen2")
    assert main(["-q", "convert-gguf", "--gguf", str(path), "--save_path", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file() and "saved fp16 model" in capsys.readouterr().out
    assert main(["-q", "convert-gguf", "--gguf", str(tmp_path / "nope.gguf"), "--save-path", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsezip: error:") and "does not exist" in err[0]
    assert not (tmp_path / "o2").exists()


# --------------------------------------------------------------------------- the real demo model

@pytest.mark.slow
def test_real_demo_gguf_equals_reference_bit_for_bit(tmp_path):
    """The demo GGUF (Q4_1, Q8_0, F32) converts to exactly the tensors of the demo model folder, which
    transformers' whole-model GGUF import made: bit for bit, not merely within dequantization rounding,
    since both dequantize with gguf's numpy code and round fp32 to fp16 once."""
    from sparsezip_demo.assets import demo_gguf, demo_model_dir

    reference = demo_model_dir()
    path = demo_gguf(tmp_path / "wheel")
    out = convert_gguf([path], tmp_path / "out")
    got, want = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert sorted(got) == sorted(want)
    different = [k for k in want if not torch.equal(got[k].view(torch.int16), want[k].view(torch.int16))]
    assert different == []
    cfg, ref_cfg = (json.loads((d / "config.json").read_text()) for d in (out, reference))
    assert {k: v for k, v in cfg.items() if k != "transformers_version"} == \
        {k: v for k, v in ref_cfg.items() if k != "transformers_version"}
    assert (out / "chat_template.jinja").read_text() == (reference / "chat_template.jinja").read_text()
    assert (out / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
    shutil.rmtree(tmp_path / "wheel", ignore_errors=True)
    assert os.listdir(tmp_path) == ["out"]
