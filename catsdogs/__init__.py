"""The torch-free ground floor every part of the project builds on.

Preprocessing (the one implementation, used by training, export and the server), the model
contract carried inside the ONNX file, a cascade file's steps (``cascade``), drift statistics,
opening and checking a model file, hashing, the prepared-data manifest, classification metrics,
the CPUs a process may use (``cpus``), photo folders (``photos``), multipart bodies for the load
tools (``multipart``) and the text of the model-quality report (``cv_text``). It needs numpy and
Pillow (and onnxruntime to open a model file) and imports nothing from ``server``,
``training``, ``export``, ``monitoring`` or ``loadtest``: those are its clients
(tests/serve/test_architecture.py).
"""
