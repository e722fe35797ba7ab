PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test fuzz compile-check demo lint format clean

$(BIN)/nibble: pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(BIN)/nibble

test: $(BIN)/nibble
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	TRITON_INTERPRET=1 $(BIN)/python -m pytest -n 2 tests
	# The tests whose paths depend on the CPU's bf16 again, as on the other kind of CPU (NIBBLE_CPU_BF16 flipped).
	TRITON_INTERPRET=1 NIBBLE_CPU_BF16=$$($(BIN)/python -c "import nibble.devices as d; print(int(not d.cpu_has_native_bf16()))") \
		$(BIN)/python -m pytest -n 2 -m cpu_bf16 tests

# Longer fuzzing of every parser of outside input (the test suite runs 25 examples each).
fuzz: $(BIN)/nibble
	NIBBLE_FUZZ_EXAMPLES=$${NIBBLE_FUZZ_EXAMPLES:-2000} $(BIN)/python -m pytest -n 2 -p no:cacheprovider tests/test_fuzz.py

# Every autotune config of the Triton kernels compiled for sm_80 and sm_90 (the test suite compiles a few).
compile-check: $(BIN)/nibble
	NIBBLE_COMPILE_ALL=1 $(BIN)/python -m pytest -n 2 tests/kernels/test_triton_compile.py

demo: $(BIN)/nibble
	$(BIN)/nibble demo

lint: $(BIN)/nibble
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(BIN)/nibble
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
