"""The Gradio app's tabs (one module each) and the shared session/run context. The `finetune` package never
imports from here; everything here turns widget values into a RunConfig and calls the package."""

from .app import build_app, launch_kwargs
from .context import AppContext, create_context

__all__ = ["AppContext", "build_app", "create_context", "launch_kwargs"]
