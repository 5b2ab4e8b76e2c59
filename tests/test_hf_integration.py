"""transformers loads W16A16S and W16A16SC folders through sparsezip's registered quantizer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import sparsezip  # noqa: F401  (registers quant_method "sparsezip" with transformers)
from sparsezip.checkpoint import read_safetensors_header
from sparsezip.compress import compress
from sparsezip.config import SparsifyConfig
from sparsezip.errors import SparsezipError
from sparsezip.generate import SamplingParams, generate_batch, prompt_ids, stop_ids
from sparsezip.integrations.hf_quantizer import FusedRows, SparsezipConfig
from sparsezip.layouts.compressed import CompressedLinear
from sparsezip.layouts.dense import DenseLinear
from sparsezip.layouts.sparse import SparseLinear
from sparsezip.layouts.base import WeightLayout
from sparsezip.runtime import load_model
from sparsezip.sparsify import sparsify

FAMILIES = ["llama", "llama3", "qwen2", "qwen3", "mistral"]


@pytest.fixture(scope="module")
def folders(tiny_dir, text_file, tmp_path_factory):
    """family -> (W16A16S folder, one-part W16A16SC folder, two-part W16A16SC folder)."""
    made = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"hf-{family}")
        sparse = sparsify(tiny_dir(family), root / "s", SparsifyConfig(method="wanda", sparsity=0.5, calib=[text_file],
                                                                     calib_samples=4, calib_seqlen=32))
        compress(sparse, root / "c1", tp=1)
        compress(sparse, root / "c2", tp=2)
        made[family] = (sparse, root / "c1", root / "c2")
    return made


def config_of(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_sparsify_and_compress_name_the_format_in_config_json(folders):
    sparse, c1, c2 = folders["llama"]
    assert config_of(sparse)["quantization_config"] == {"quant_method": "sparsezip", "format": "W16A16S",
                                                        "version": "1.0.0"}
    assert config_of(sparse)["transformers_weights"] == "quant_model_weights.safetensors"
    assert config_of(c1)["quantization_config"]["format"] == "W16A16SC"
    assert config_of(c2)["quantization_config"]["tp_size"] == 2
    assert "transformers_weights" not in config_of(c1)  # a part's streams mean nothing without sparsezip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which, weights, layer_class", [(0, "auto", SparseLinear), (1, "auto", SparseLinear),
                                                         (1, "compressed", CompressedLinear),
                                                         (0, "dense", DenseLinear)])
def test_transformers_model_gives_our_runtimes_logits(folders, family, which, weights, layer_class,
                                                      fake_layout_timings):
    folder = folders[family][which]
    fake_layout_timings({"sparse": 0.1, "dense": 0.2, "compressed": 0.3})  # auto: the sparse layout measured fastest
    hf = AutoModelForCausalLM.from_pretrained(folder, quantization_config=SparsezipConfig(weights=weights))
    attention = hf.model.layers[0].self_attn
    assert isinstance(attention.q_proj, FusedRows) and isinstance(hf.model.layers[0].mlp.down_proj, layer_class)
    assert isinstance(attention.qkv_proj, layer_class)
    assert hf.model.embed_tokens.weight.dtype == hf.lm_head.weight.dtype == torch.float16  # as stored, not fp32
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == hf.config.tie_word_embeddings
    ours = load_model(folder, weights="dense")
    ids = torch.tensor([[5, 77, 130, 9, 260, 41, 3, 200]])
    with torch.no_grad():
        expected, got = ours(ids), hf(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_generate_gives_our_tokens_and_memory_stays_sparse(folders, tiny_dir):
    sparse, c1, _ = folders["qwen2"]
    tokenizer = AutoTokenizer.from_pretrained(c1)
    prompt = prompt_ids(tokenizer, "It is a truth universally acknowledged", use_chat_template=False)
    expected = generate_batch(load_model(c1, weights="sparse"), tokenizer, [prompt],
                              SamplingParams(max_new_tokens=12), set())[0].tokens
    for folder in (sparse, c1):
        hf = AutoModelForCausalLM.from_pretrained(folder)
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None)
        assert out[0, len(prompt):].tolist() == expected
    dense = AutoModelForCausalLM.from_pretrained(tiny_dir("qwen2"), dtype=torch.float16)
    fp16_bytes = sum(p.numel() * 2 for name, p in dense.named_parameters() if name.endswith("proj.weight"))
    for weights, most in (("compressed", 0.7), ("sparse", 0.8)):
        hf = AutoModelForCausalLM.from_pretrained(c1, quantization_config=SparsezipConfig(weights=weights))
        layers = [m for m in hf.model.layers.modules() if isinstance(m, WeightLayout) and m.bias is None]
        held = sum(m.resident_bytes() for m in layers)
        assert 0.2 * fp16_bytes < held < most * fp16_bytes


def test_several_parts_are_refused_with_a_clear_error(folders):
    with pytest.raises(SparsezipError, match="has 2 parts; transformers loads a W16A16SC folder of one part"):
        AutoModelForCausalLM.from_pretrained(folders["llama"][2])


def test_unknown_layout_and_a_format_that_disagrees_with_the_folder_are_refused(folders, tmp_path):
    with pytest.raises(SparsezipError, match="unknown weights layout 'fast'"):
        AutoModelForCausalLM.from_pretrained(folders["llama"][0], quantization_config=SparsezipConfig(weights="fast"))
    sparse = folders["llama"][0]
    lying = tmp_path / "lying"
    lying.mkdir()
    for f in sparse.iterdir():
        (lying / f.name).write_bytes(f.read_bytes())
    config = config_of(lying)
    config["quantization_config"]["format"] = "W16A16SC"
    (lying / "config.json").write_text(json.dumps(config))
    with pytest.raises(SparsezipError, match="config.json says W16A16SC, but there are no part folders"):
        AutoModelForCausalLM.from_pretrained(lying)
    config["quantization_config"].update(format="W16A16S", version="9.0.0")
    (lying / "config.json").write_text(json.dumps(config))
    with pytest.raises(SparsezipError, match="is format version 9.0.0; this sparsezip reads versions 1.x"):
        AutoModelForCausalLM.from_pretrained(lying)


@pytest.mark.parametrize("first", ["import sparsezip", "import transformers.quantizers.auto"])
def test_registered_whichever_is_imported_first_and_import_sparsezip_stays_light(first):
    second = "import transformers.quantizers.auto" if first == "import sparsezip" else "import sparsezip"
    code = (f"import sys\n{first}\nlight = 'transformers' not in sys.modules\n{second}\n"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING\n"
            "print(light, 'sparsezip' in AUTO_QUANTIZER_MAPPING)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == (["True", "True"] if first == "import sparsezip" else ["False", "True"])


@pytest.mark.slow
def test_demo_generate_in_transformers_answers_like_sparsezip_run(demo, sparsezip_cli, sparsezip_ok):
    _, sparse, root = demo
    prompt = "What's deep learning?"
    tokenizer = AutoTokenizer.from_pretrained(root / "c1")
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True, tokenize=True, return_dict=False)])
    for folder in (sparse, root / "c1"):
        result = sparsezip_ok(sparsezip_cli("run", "--model_path", str(folder), "--input_texts", prompt,
                                            "--max_output_length", "16"))
        answer = next(line for line in result.stdout.splitlines() if line.startswith("Answer[0]: "))
        hf = AutoModelForCausalLM.from_pretrained(folder)
        out = hf.generate(ids, max_new_tokens=16, do_sample=False)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        assert answer == f"Answer[0]: {text.strip()}" and len(text.split()) >= 5


def test_damaged_folders_are_refused_before_any_weight_is_used(folders, tmp_path):
    """A flipped byte in a codec stream fails its CRC; a truncated W16A16S file is named, never half-loaded."""
    compressed = Path(shutil.copytree(folders["llama"][1], tmp_path / "c1"))
    part = compressed / "part0-of-1" / "quant_model_weight_w16a16sc.safetensors"
    start, entries = read_safetensors_header(part)
    begin, end = next(e["data_offsets"] for name, e in entries.items() if name.endswith("qkv_proj.weight"))
    data = bytearray(part.read_bytes())
    data[start + (begin + end) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(SparsezipError, match="qkv_proj.weight: .*CRC mismatch"):
        AutoModelForCausalLM.from_pretrained(compressed)
    sparse = Path(shutil.copytree(folders["llama"][0], tmp_path / "s"))
    weights = sparse / "quant_model_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(SparsezipError, match="quant_model_weights.safetensors"):
        AutoModelForCausalLM.from_pretrained(sparse)


@pytest.mark.parametrize("which", [0, 1])
def test_a_forward_outside_no_grad_works_and_a_backward_is_refused(folders, which):
    """transformers users call the model without torch.no_grad; our kernels read tensors as numpy arrays."""
    hf = AutoModelForCausalLM.from_pretrained(folders["qwen2"][which])
    ids = torch.tensor([[5, 77, 130, 9]])
    with torch.no_grad():
        expected = hf(ids).logits
    got = hf(ids).logits
    assert torch.equal(got.detach(), expected)
    with pytest.raises(SparsezipError, match="pruned linears are for inference"):
        got.sum().backward()


@pytest.mark.parametrize("damage, expected", [
    (lambda t: t.pop("model.norm.weight"), "lacks tensor model.norm.weight"),
    (lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:-1].clone()}), "model.norm.weight has shape"),
], ids=["missing", "misshapen"])
def test_a_part_without_a_tensor_transformers_needs_is_refused(folders, tmp_path, damage, expected):
    """transformers would fill a missing tensor with fresh values and only print a report."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(folders["llama"][1], tmp_path / "c1"))
    part = folder / "part0-of-1"
    tensors = load_file(part / "quant_model_weight_w16a16sc.safetensors")
    damage(tensors)
    save_file(tensors, part / "quant_model_weight_w16a16sc.safetensors")
    description = json.loads((part / "quant_model_description.json").read_text())
    description = {k: v for k, v in description.items() if k in tensors or not k.startswith("model.norm")}
    (part / "quant_model_description.json").write_text(json.dumps(description))
    with pytest.raises(SparsezipError, match=expected):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_compressed_folder_computes_in_bfloat16_like_the_dense_layout(folders):
    ids = torch.tensor([[5, 77, 130, 9]])
    logits = []
    for weights in ("compressed", "dense"):
        hf = AutoModelForCausalLM.from_pretrained(folders["llama"][1], dtype=torch.bfloat16,
                                                  quantization_config=SparsezipConfig(weights=weights))
        with torch.no_grad():
            logits.append(hf(ids).logits)
    assert logits[0].dtype == torch.bfloat16 and torch.equal(logits[0], logits[1])
