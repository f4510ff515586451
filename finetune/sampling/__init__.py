"""Sampling over loaded SDXL parts: the pipelines, rendering and grids that training samples and the tools share."""
