"""ZeRO stages 1-3 and sharded checkpoints: equivalence with single-process training on gloo worlds 1..4."""
