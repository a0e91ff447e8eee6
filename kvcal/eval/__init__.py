"""Quality measurement: continuation perplexity and long-context retrieval under a cache method."""
