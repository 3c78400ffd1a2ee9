"""finetune: LoRA, QLoRA and full fine-tuning of causal language models, as a library and a CLI.

The package never imports gradio; the app (app.py, ui/) is a thin layer over it.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes warns at import that an optional CPU kernel (downloaded from the Hub) is missing; its built-in
# kernel is used instead, so the warning only alarms users.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
