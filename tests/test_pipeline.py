"""sparsify -> compress -> run/eval on tiny random models: formats, TP split, and W16A16S == W16A16SC."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sparsezip.compress import compress
from sparsezip.config import ModelArgs, SparsifyConfig, read_json
from sparsezip.data import eval_windows
from sparsezip.evaluate import perplexity
from sparsezip.formats import COMPRESSED_FILE, DESCRIPTION_FILE, SPARSE_STEM, Description
from sparsezip.generate import SamplingParams, generate_batch
from sparsezip.runtime import load_model
from sparsezip.sparsify import sparsify

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def pipeline(tiny_dir, text_file, tmp_path_factory):
    """family -> (dense, W16A16S, {tp: W16A16SC}) built once per module."""
    built = {}

    def build(family: str):
        if family not in built:
            root = tmp_path_factory.mktemp(f"pipe-{family}")
            dense = tiny_dir(family)
            sparse = sparsify(dense, root / "s", SparsifyConfig(method="wanda", sparsity=0.5, calib=[text_file],
                                                                calib_samples=8, calib_seqlen=64))
            packed = {tp: root / f"c{tp}" for tp in (1, 2)}
            for tp, out in packed.items():
                compress(sparse, out, tp=tp, verify=True)
            built[family] = (dense, sparse, packed)
        return built[family]

    return build


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_w16a16s_folder_follows_the_format(pipeline, family):
    dense, sparse, _ = pipeline(family)
    desc = read_json(sparse / DESCRIPTION_FILE)
    assert desc["model_quant_type"] == "W16A16S" and desc["version"] == "1.0.0"
    assert desc["metadata"]["method"] == "wanda" and desc["metadata"]["calibration_tokens"] == 8 * 64
    stored = safetensors_keys(sparse / f"{SPARSE_STEM}.safetensors")
    assert set(Description.from_json(desc, sparse).tensors) == stored
    with safe_open(str(dense / "model.safetensors"), "pt") as f:
        assert stored == set(f.keys())  # every source tensor is kept, under its Hugging Face name
    for name in stored:
        expected = "W16A16S" if name.split(".")[-2] in LINEARS else "FLOAT"
        assert desc[name] == expected, name
    assert read_json(sparse / "config.json")["torch_dtype"] == "float16"
    assert (sparse / "tokenizer.json").is_file() and (sparse / "chat_template.jinja").is_file()


def test_wanda_zeroes_half_of_every_row_with_positive_zeros(pipeline):
    _, sparse, _ = pipeline("llama")
    with safe_open(str(sparse / f"{SPARSE_STEM}.safetensors"), "pt") as f:
        for name in f.keys():
            w = f.get_tensor(name)
            assert w.dtype == torch.float16
            if name.split(".")[-2] in LINEARS:
                bits = w.view(torch.int16)
                assert ((bits == 0).sum(1) == w.shape[1] // 2).all(), name
                assert not (bits == -32768).any(), f"{name} holds -0.0, which the codec would store"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("tp", [1, 2])
def test_parts_have_fused_widths_and_matching_keys(pipeline, family, tp):
    dense, _, packed = pipeline(family)
    args = ModelArgs.from_dir(dense)
    expected_outdim = {
        "self_attn.qkv_proj": (args.num_heads + 2 * args.num_kv_heads) * args.head_dim // tp,
        "self_attn.o_proj": args.hidden_size,
        "mlp.gate_up_proj": 2 * args.intermediate_size // tp,
        "mlp.down_proj": args.hidden_size,
    }
    expected_in = {"self_attn.qkv_proj": args.hidden_size, "self_attn.o_proj": args.num_heads * args.head_dim // tp,
                   "mlp.gate_up_proj": args.hidden_size, "mlp.down_proj": args.intermediate_size // tp}
    parts = sorted(p.name for p in packed[tp].iterdir() if p.is_dir())
    assert parts == [f"part{r}-of-{tp}" for r in range(tp)]
    for r in range(tp):
        part = packed[tp] / f"part{r}-of-{tp}"
        desc = read_json(part / DESCRIPTION_FILE)
        assert desc["model_quant_type"] == "W16A16SC" and desc["metadata"]["tp_size"] == tp
        assert desc["metadata"]["rank"] == r and desc["metadata"]["codec"] == "nibble-v3"  # the default codec
        assert set(Description.from_json(desc, part).tensors) == safetensors_keys(part / COMPRESSED_FILE)
        with safe_open(str(part / COMPRESSED_FILE), "pt") as f:
            for layer in range(args.num_layers):
                for linear, outdim in expected_outdim.items():
                    prefix = f"model.layers.{layer}.{linear}"
                    assert desc[prefix + ".weight.outdim"] == outdim
                    info = f.get_tensor(prefix + ".info").tolist()
                    assert info == [128, 128, expected_in[linear], outdim, 3]  # nibble-v3, the default
                    n_tiles = -(-outdim // 128) * -(-expected_in[linear] // 128)
                    assert f.get_tensor(prefix + ".index").numel() == 8 * n_tiles
                    assert desc[prefix + ".weight"] == desc[prefix + ".index"] == desc[prefix + ".info"] == "W16A16SC"
            assert desc["model.embed_tokens.weight"] == "FLOAT"
            assert f.get_tensor("model.embed_tokens.weight").shape[0] == args.vocab_size // tp


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compressed_model_gives_identical_logits_tokens_and_perplexity(pipeline, family, text_file):
    _, sparse, packed = pipeline(family)
    a, b = load_model(sparse), load_model(packed[1])
    for (name, x), (_, y) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert torch.equal(x, y), name
    tokens = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sparse)
    prompt, greedy = tokens[0, :10].tolist(), SamplingParams(max_new_tokens=12)
    answers = [generate_batch(m, tokenizer, [prompt], greedy, set())[0].tokens for m in (a, b)]
    assert len(answers[0]) == 12 and answers[0] == answers[1]
    windows = eval_windows(tokenizer, [text_file], 64, 4)
    assert perplexity(a, windows, show_progress=False) == perplexity(b, windows, show_progress=False)


@pytest.mark.slow
def test_tensor_parallel_run_and_eval_match_between_sparse_and_compressed(pipeline, text_file, sparsezip_cli,
                                                                         sparsezip_ok):
    _, sparse, packed = pipeline("qwen3")
    outputs = {}
    for name, folder in (("sparse", sparse), ("packed", packed[2])):
        run = sparsezip_ok(sparsezip_cli("run", "--model_path", str(folder), "--max_output_length", "10", nproc=2))
        ev = sparsezip_ok(sparsezip_cli("eval", "--model_path", str(folder), "--data", str(text_file),
                                      "--seqlen", "64", "--max_windows", "3", nproc=2))
        answers = [line for line in run.stdout.splitlines() if line.startswith(("Answer[0]", "Generate[0] token"))]
        # the perplexity line ends with the folder's kind and path, which differ by design
        outputs[name] = answers + [line.split(";")[0] for line in ev.stdout.splitlines() if line.startswith("perplexity")]
    assert len(outputs["sparse"]) == 3
    assert outputs["sparse"] == outputs["packed"]
    # and the tensor-parallel answer is the one-process answer, and the sparse weight mode's
    alone = sparsezip_ok(sparsezip_cli("run", "--model_path", str(sparse), "--max_output_length", "10"))
    assert [line for line in alone.stdout.splitlines() if line.startswith("Answer[0]")] == outputs["sparse"][:1]
    memory = re.search(r"^Memory: (\d+) MiB after loading, peak (\d+) MiB \(cpu\)$", alone.stdout, re.M)
    assert memory and 0 < int(memory[1]) <= int(memory[2]), alone.stdout
    lean = sparsezip_ok(sparsezip_cli("run", "--model_path", str(packed[2]), "--max_output_length", "10",
                                      "--weights", "sparse", nproc=2))
    assert [line for line in lean.stdout.splitlines() if line.startswith("Answer[0]")] == outputs["sparse"][:1]


@pytest.mark.slow
def test_torchrun_compress_writes_the_same_parts_as_one_process(pipeline, tmp_path, sparsezip_cli, sparsezip_ok):
    _, sparse, packed = pipeline("llama")
    sparsezip_ok(sparsezip_cli("compress", "--model_path", str(sparse), "--save_directory", str(tmp_path / "c"),
                             nproc=2))
    for r in range(2):
        part = f"part{r}-of-2"
        a = (tmp_path / "c" / part / COMPRESSED_FILE).read_bytes()
        assert a == (packed[2] / part / COMPRESSED_FILE).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
