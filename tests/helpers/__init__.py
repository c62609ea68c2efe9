"""Code the tests share (fixtures stay in tests/conftest.py): ``from tests.helpers.<module> import ...``.

configs: the typed config a command line composes · checkpoints: random DeepSeek-V3 checkpoints in R1's layout ·
cli: the real CLI in a subprocess · vllm: the vLLM environment the deploy tests use.
"""
