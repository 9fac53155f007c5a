"""The conversion's passes and what they use (the floor below ``moefy.convert``).

    trace → find_ffn (projection, elementwise) → plan → calibrate → build | peer → fit,
    fit_peer → swap (rewrite) → verify → distill;  stages: the typed stages between them;
    base: the Pass protocol

May import: ``moefy.layers``, ``moefy.runtime`` and the ground floor (config, errors,
activations, version); never ``moefy.convert`` or anything above it.
"""
