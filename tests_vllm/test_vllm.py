"""The vLLM plugin (sparsezip.integrations.vllm): vLLM loads W16A16S and W16A16SC folders, holds the pruned
linears in the sparse layout, and generates the tokens our runtime generates.

The end-to-end cases start vLLM's CPU engine in a process of their own (run_vllm.py), 1.5 to 2.5 minutes each on
two cores; the rest checks the pieces without an engine. SPARSEZIP_VLLM_TEST_DIR keeps the test folders between
runs (conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import MAX_TOKENS
from sparsezip.checkpoint import TensorReader
from sparsezip.errors import SparsezipError
from sparsezip.formats import weight_files

HERE = Path(__file__).resolve().parent
DEMO_LAYERS = 30  # SmolLM2-135M's decoder layers, each with four vLLM linears (qkv, o, gate_up, down)
LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def test_importing_sparsezip_does_not_import_vllm():
    code = ("import sys, sparsezip, sparsezip.runtime, sparsezip.cli, sparsezip.formats, sparsezip.integrations; "
            "sys.exit(int('vllm' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=300).returncode == 0


def test_vllm_finds_the_plugin():
    from importlib.metadata import entry_points

    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("sparsezip") == "sparsezip.integrations.vllm:register"


def test_the_quantization_config_refuses_what_is_not_ours():
    from sparsezip.integrations.vllm import SparsezipConfig

    assert SparsezipConfig.from_config({"quant_method": "sparsezip", "format": "W16A16SC", "tp_size": 2}).kind == \
        "W16A16SC"
    with pytest.raises(SparsezipError, match="format"):
        SparsezipConfig.from_config({"quant_method": "sparsezip", "format": "dense"})
    with pytest.raises(SparsezipError, match="quant_method"):
        SparsezipConfig.from_config({"quant_method": "awq", "format": "W16A16S"})


def pruned_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    weight = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)).half()
    return torch.where(torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed + 1)) < 0.5, 0, weight)


def test_the_linear_method_packs_the_weight_and_computes_the_same_product():
    from sparsezip.integrations.vllm import SparseLinearMethod, SparsezipConfig

    method = SparsezipConfig.from_config({"quant_method": "sparsezip", "format": "W16A16S"}).get_quant_method(
        torch.nn.Linear(1, 1), "x")
    assert method is None  # not a vLLM linear: left to vLLM
    weight = pruned_weight(96, 200)
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(weight.float(), requires_grad=False)
    method = SparseLinearMethod()
    method.process_weights_after_loading(layer)
    assert layer.weight.numel() == 0 and layer.sparse_shape == (96, 200)
    assert sum(t.nbytes for t in layer.sparse_arrays) < weight.numel() * 2  # fewer bytes than the fp16 matrix
    bias = torch.randn(96)
    for rows in (1, 3, 40):  # straight from the layout, and unpacked into the scratch buffer
        x = torch.randn(rows, 200)
        torch.testing.assert_close(method.apply(layer, x, bias), F.linear(x, weight.float(), bias))
    compiled = torch.compile(lambda x: method.apply(layer, x, bias), fullgraph=True, backend="eager")
    x = torch.randn(2, 200)  # the custom op keeps torch.compile (vLLM's default mode) from tracing into the kernels
    torch.testing.assert_close(compiled(x), F.linear(x, weight.float(), bias))


def test_the_linear_method_refuses_weights_that_are_not_fp16():
    from sparsezip.integrations.vllm import SparseLinearMethod

    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.full((8, 16), 1 + 2**-20), requires_grad=False)
    with pytest.raises(SparsezipError, match="float16"):
        SparseLinearMethod().process_weights_after_loading(layer)


@pytest.mark.parametrize("parts", ["SC1", "SC3"])
def test_compressed_parts_decode_to_the_sparsified_tensors(folders, parts):
    from sparsezip.integrations.vllm import compressed_folder, hf_tensors_from_parts

    assert compressed_folder(str(folders["S"])) is None  # vLLM's own loader reads W16A16S folders
    assert compressed_folder(str(folders[parts])) == folders[parts]
    stored = TensorReader(weight_files(folders["S"]))
    decoded = dict(hf_tensors_from_parts(folders[parts]))
    assert sorted(decoded) == sorted(stored.names())
    for name, tensor in decoded.items():
        assert torch.equal(tensor, stored.get(name)), name  # the codec is lossless: bit for bit


def run_vllm(folder: Path, tp: int, prompt: list[int]) -> dict:
    # apply_model ships a function to the workers, which vLLM sends only with insecure serialization on
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_ALLOW_INSECURE_SERIALIZATION="1",
               VLLM_CPU_OMP_THREADS_BIND=threads_bind(tp), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, str(HERE / "run_vllm.py"), str(folder), "--tp", str(tp),
                           "--prompt_ids", json.dumps(prompt), "--max_tokens", str(MAX_TOKENS)],
                          capture_output=True, text=True, timeout=900, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"vLLM failed (rc {done.returncode}):\n{done.stderr[-6000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def threads_bind(tp: int) -> str:
    """vLLM CPU's core list per worker: all cores for one, else one core each, shared round robin when the
    workers outnumber the cores (3 on a 2-core machine)."""
    cores = os.cpu_count() or 1
    return f"0-{cores - 1}" if tp == 1 else "|".join(str(rank % cores) for rank in range(tp))


def without_final_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """vLLM returns the EOS that ended a generation; our runtime stops before it."""
    return tokens[:-1] if tokens and tokens[-1] in eos else tokens


# TP 3, not 2: the demo model's 9 heads and 3 KV heads split only into 1 or 3
@pytest.mark.parametrize("folder, tp", [("S", 1), ("S", 3), ("SC1", 1), ("SC3", 3)],
                         ids=["W16A16S-tp1", "W16A16S-tp3", "W16A16SC-1part-tp1", "W16A16SC-3parts-tp3"])
@pytest.mark.slow
def test_vllm_generates_our_tokens_from_sparse_linears(folders, reference, folder, tp):
    assert len(reference["tokens"]) > 1  # an answer to compare, not an EOS at once
    result = run_vllm(folders[folder], tp, reference["prompt"])
    assert result["quantization"] == "sparsezip"
    assert without_final_eos(result["tokens"], reference["eos"]) == reference["tokens"]
    assert len(result["workers"]) == tp
    expected = {f"model.layers.{i}.{linear}" for i in range(DEMO_LAYERS) for linear in LINEARS}
    for worker in result["workers"]:
        assert set(worker) == expected  # every pruned linear, and nothing else, in the sparse layout
        for name, held in worker.items():
            assert held["dense_numel"] == 0, name  # the dense weight is gone
            assert held["sparse_bytes"] < 0.75 * 2 * held["rows"] * held["cols"], name  # well under fp16's bytes
    qkv = result["workers"][0]["model.layers.0.self_attn.qkv_proj"]
    assert (qkv["rows"], qkv["cols"]) == ((576 + 2 * 192) // tp, 576)  # vLLM's per-rank split of q, k, v


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, body: dict | None = None, timeout: float = 10) -> dict:
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the API server and its engine core), SIGKILL after a grace period;
    then checks that no process of the group is left."""
    import signal
    import time

    for sig, grace in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + grace  # the leader is gone: give the engine core its grace period too
        while time.monotonic() < deadline:
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.5)
    server.wait(timeout=30)
    with pytest.raises(ProcessLookupError):
        os.killpg(server.pid, 0)  # nothing of the server's group is left running


@pytest.mark.slow
def test_vllm_openai_server_serves_a_compressed_folder(folders, reference, tmp_path):
    """`python -m vllm.entrypoints.openai.api_server` on the W16A16SC folder answers /v1/completions with our
    runtime's greedy tokens (`vllm serve` is broken in this vLLM build)."""
    import time
    import urllib.error

    from sparsezip.data import auto_tokenizer

    assert len(reference["tokens"]) > 1
    folder, port = folders["SC1"], free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND=threads_bind(1),
               TOKENIZERS_PARALLELISM="false")
    log = tmp_path / "server.log"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the server
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--dtype", "float32",
             "--enforce-eager", "--max-model-len", "512", "--generation-config", "vllm", "--seed", "0",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def tail() -> str:
        return log.read_text(errors="replace")[-6000:]

    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, f"the vLLM server exited (rc {server.returncode}):\n{tail()}"
            assert time.monotonic() < deadline, f"the vLLM server was not healthy in 600 s:\n{tail()}"
            try:
                http_json(f"{base}/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                time.sleep(2)
        models = [m["id"] for m in http_json(f"{base}/v1/models")["data"]]
        assert models == [str(folder)], models
        try:
            answer = http_json(f"{base}/v1/completions", {
                "model": models[0], "prompt": reference["prompt"], "max_tokens": MAX_TOKENS, "temperature": 0,
                "return_token_ids": True}, timeout=300)
        except urllib.error.HTTPError as error:
            pytest.fail(f"/v1/completions: HTTP {error.code} {error.read()[:2000]!r}\n{tail()}")
    finally:
        stop_server(server)
    choice = answer["choices"][0]
    assert choice["prompt_token_ids"] == reference["prompt"]
    assert without_final_eos(choice["token_ids"], reference["eos"]) == reference["tokens"]
    expected_text = auto_tokenizer(folder).decode(reference["tokens"], skip_special_tokens=True)
    assert choice["text"] == expected_text
    assert answer["usage"]["completion_tokens"] == len(choice["token_ids"])
