"""Semantic item embeddings and the Long-Short Modality Retriever."""
