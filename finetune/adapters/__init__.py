"""LoRA adapters: injection (peft), file formats (kohya for A1111/Forge/ComfyUI, diffusers/PEFT), reading."""
