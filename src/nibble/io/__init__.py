"""Reading and writing weights and model files: safetensors, bitsandbytes 4-bit checkpoints, and more."""
