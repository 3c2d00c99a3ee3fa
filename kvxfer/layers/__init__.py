"""Model building blocks: TP linears and embeddings, norms, rotary embedding, attention ops."""
