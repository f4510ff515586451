"""LoRA adapters (LoRA, DoRA, LoHa, LoKr): injection (peft), file formats (kohya for A1111/Forge/ComfyUI,
diffusers/PEFT), reading files from other tools, conversion and init_from."""
