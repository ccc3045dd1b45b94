"""minikv inside vLLM: an attention backend that stores the KV cache in minikv's KIVI layout in vLLM's
paged blocks (``pip install "minikv[vllm]"``, docs/serving.md, "Serving with vLLM").

- :mod:`.settings`: the backend's knobs, read from the ``MINIKV_VLLM`` environment variable.
- :mod:`.layout`: where each part of a token lives inside one block of one KV head (no vLLM import).
- :mod:`.paged`: writing tokens into the pages and attending over them (no vLLM import).
- :mod:`.backend`: the vLLM classes (backend, metadata builder, implementation).
- :mod:`.plugin`: the ``vllm.general_plugins`` entry point that registers the backend.

Importing this package imports neither vLLM nor transformers.
"""
