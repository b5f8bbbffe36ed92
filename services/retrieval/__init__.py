"""The retrieval service: history -> ONNX user vector -> Faiss top-k (``POST /retrieve``)."""
