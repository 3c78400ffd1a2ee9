"""finetune: LoRA, QLoRA and full fine-tuning of causal language models, as a library and a CLI.

The package never imports gradio; the app (app.py, ui/) is a thin layer over it.
"""

__version__ = "0.1.0"
