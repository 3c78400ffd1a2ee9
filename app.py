"""`python app.py`: the fine-tuning app on http://127.0.0.1:7860 (or $GRADIO_SERVER_PORT / $PORT).

Runs and uploads live in $FINETUNE_WORKSPACE (default ./workspace). Offline, pick the `demo` model and a
bundled example dataset: the whole flow (data → train → compare → export) works without network.
On a Hugging Face Space this file is the `app_file` (see space.yaml).
"""

from __future__ import annotations

import os

from finetune.hub import keep_owner_token_from_visitors
from ui import build_app, launch_kwargs


def main() -> None:
    keep_owner_token_from_visitors()  # in a Space: Hub loads never use the owner's HF_TOKEN (finetune/hub.py)
    demo = build_app()
    port = int(os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT") or 7860)
    host = os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1")
    demo.launch(server_name=host, server_port=port, **launch_kwargs(demo.ctx))


if __name__ == "__main__":
    main()
