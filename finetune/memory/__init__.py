"""Memory and speed: profiles and the pre-flight estimate, activation checkpointing, the fused
backward for full fine-tuning, and quantized (fp8/NF4) frozen bases."""
