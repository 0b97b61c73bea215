"""The torch-free ground floor every part of the project builds on.

Preprocessing (the one implementation, used by training, export and the server), the model
contract carried inside the ONNX file, drift statistics, opening and checking a model file,
hashing, the prepared-data manifest and classification metrics. It needs numpy and Pillow (and
onnxruntime to open a model file) and imports nothing from ``server``, ``training``,
``export``, ``monitoring`` or ``loadtest``: those are its clients (tests/test_architecture.py).
"""
