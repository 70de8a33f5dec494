"""Building blocks of the transformer: normalization, rotary embeddings, paged attention."""
