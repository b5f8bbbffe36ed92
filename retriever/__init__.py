"""Stage 1: sequential retrievers (SASRec, LRURec), Faiss index, ONNX user encoder."""
