"""FX passes: tracing, FFN matching, partitioning, builders, module surgery."""
