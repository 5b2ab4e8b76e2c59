"""Tiny random models of every supported family, built in temporary folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 320
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def sample_text() -> str:
    """200k characters of Persuasion; a missing corpus is an error (austen_dir says where it looked), never a
    silent substitute that would change what the tests measure."""
    from sparsezip_demo.assets import austen_dir

    return (austen_dir() / "persuasion.txt").read_text(encoding="utf-8")[:200_000]


def save_tokenizer(folder: Path) -> None:
    """A small byte-level BPE tokenizer trained on Austen, with ChatML specials and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([sample_text()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


FAMILIES = {
    "llama": dict(model_type="llama", tie_word_embeddings=True),
    "llama3": dict(model_type="llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=32),
    "mistral": dict(model_type="mistral", sliding_window=8),
}


def hf_config(family: str, **overrides):
    from transformers import AutoConfig

    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                bos_token_id=0, eos_token_id=2, pad_token_id=0)
    base.update(spec)
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def make_tiny_model(folder: Path, family: str = "llama", dtype=torch.float16, seed: int = 0, **overrides) -> Path:
    """Save a random Hugging Face model of `family` (with tokenizer) into `folder`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides), torch_dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init so that pruning visibly matters
        for name, p in model.named_parameters():
            if p.dim() == 2 or name.endswith(".bias"):  # biases too: they start at zero, and would test nothing
                p.normal_(0, 0.08)
    model.to(dtype).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory for cached tiny models: tiny_dir("qwen3") -> folder."""
    cache: dict[str, Path] = {}

    def build(family: str = "llama", **overrides) -> Path:
        key = family + json.dumps(overrides, sort_keys=True, default=str)
        if key not in cache:
            cache[key] = make_tiny_model(tmp_path_factory.mktemp(family), family, **overrides)
        return cache[key]

    return build


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(sample_text(), encoding="utf-8")
    return path


def kernel_levels() -> list[str]:
    """Every native kernel level this machine can run (scalar up to the best detected one)."""
    from sparsezip.kernels import cpu

    if not cpu.available():
        return []
    return list(cpu.LEVELS[: cpu.LEVELS.index(cpu.features()["detected"]) + 1])


@pytest.fixture(params=kernel_levels() or [pytest.param("none", marks=pytest.mark.skip(reason="no C extension"))])
def kernel_level(request):
    """Run the test with the native kernels capped at each level in turn, so every fallback path is exercised."""
    from sparsezip.kernels import cpu

    with cpu.capped_level(request.param):
        yield request.param


@pytest.fixture
def fake_layout_timings(monkeypatch):
    """set(seconds): make `--weights auto`'s measurement (runtime.time_layouts) report seconds[name] per layout, so
    that a test knows which layout auto takes; returns the list of layout-name sets it was asked to time."""
    import sparsezip.runtime as runtime

    asked, seconds = [], {}

    def timed(classes, sources, ctx, dist):
        asked.append(set(classes))
        assert sources and all(source.shape[0] > 0 for source in sources)
        return {name: seconds[name] for name in classes}

    def fake(given: dict[str, float]) -> list[set[str]]:
        seconds.update(given)
        monkeypatch.setattr(runtime, "time_layouts", timed)
        return asked

    return fake


@pytest.fixture(scope="session")
def interpreted_triton():
    """kernels/triton/codec.py with its kernels built for the Triton interpreter (numpy on the CPU), loaded under a
    private module name: TRITON_INTERPRET is read when a kernel is decorated, so it is set only while this copy is
    imported and the shared module, and every other test, never see it."""
    import importlib.util
    import os
    import sys
    from unittest import mock

    pytest.importorskip("triton")
    import sparsezip.kernels.triton as package

    name = "sparsezip.kernels.triton._codec_interpreted"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(package.__file__).with_name("codec.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the class is built
        with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}):
            spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def sparsezip_cli(tmp_path_factory):
    """Run `python -m sparsezip -q ...` as a real process (under torchrun with nproc > 1); returns the result.
    TMPDIR points into pytest's temporary folder: torchrun leaves a torchelastic_* folder in it on every launch."""
    import os
    import subprocess
    import sys

    tmp = str(tmp_path_factory.mktemp("processes"))

    def run(*argv: str, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"), TMPDIR=tmp)
        launcher = [sys.executable, "-m", "sparsezip"] if nproc == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
            "-m", "sparsezip"]
        return subprocess.run([*launcher, "-q", *argv], capture_output=True, text=True, env=env, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def sparsezip_ok():
    """Assert that a finished CLI process succeeded (its stderr tail otherwise) and return it."""

    def check(result):
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    return check


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The real demo model (SmolLM2-135M-Instruct) pruned with Wanda at 50% and compressed into 1 and 3 parts:
    (dense folder, W16A16S folder, root holding c1/ and c3/). Built once for every slow test that needs it."""
    from sparsezip.compress import compress
    from sparsezip.config import SparsifyConfig
    from sparsezip.sparsify import sparsify
    from sparsezip_demo.assets import austen_files, demo_model_dir

    root = tmp_path_factory.mktemp("demo")
    dense = demo_model_dir()
    sparse = sparsify(dense, root / "s", SparsifyConfig(method="wanda", sparsity=0.5, calib=austen_files(["emma"]),
                                                        calib_samples=8, calib_seqlen=256))
    for tp in (1, 3):
        compress(sparse, root / f"c{tp}", tp=tp, workers=2, verify=True)
    return dense, sparse, root
