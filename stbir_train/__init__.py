"""Training side of STBIR: config, data, losses, the staged loop and evaluation (imports torch)."""
