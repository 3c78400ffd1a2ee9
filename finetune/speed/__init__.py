"""The speed layer: TRL's SFTTrainer computing the same loss and gradients in less time and memory.

`speed: off` in the run config trains with stock `trl.SFTTrainer` instead (its collator, its loss). With it on,
`FastSFTTrainer` (fast_trainer.py) pulls the levers below; `speed_levers_off` switches single ones off (the
benchmark measures each so; figures in benchmarks/RESULTS.md). Why each is ours, in one line:

- padding-free batches (batching.py; switch `padding_free`): the libraries' own flattening collator and packed
  masks from `position_ids`; ours only adds per-position targets and checks isolation on the model itself;
- `segments`: per-example attention on CPU (segment_attention.py), faster there than `sdpa` with a (T, T) mask;
- `target_head`: the LM head only where a token is predicted (`logits_to_keep`); TRL's fused head on CPU runs it
  on every position;
- `chunked_loss`: the cross-entropy forms its gradient in the forward pass: less peak memory than autograd's;
- `half_frozen_weights`: under bf16/fp16 autocast, frozen linear weights stored in that type: bit-identical, less
  memory (autocast keeps fp32 weights and their cast copies);
- `cpu_dropout`: dropout masks drawn with NumPy (dropout.py); PyTorch's CPU generator is serial on non-Intel CPUs.

This module imports nothing heavy: `finetune.config` reads `LEVERS` from it.
"""

import contextlib
import functools

LEVERS = ("segments", "target_head", "chunked_loss", "half_frozen_weights", "cpu_dropout")


@contextlib.contextmanager
def replaced_forwards(layers: list, forward):
    """Within: each of `layers` runs `forward(layer, x)` instead of its class's forward, restored on leaving (a lever
    scoped to a block: CPU dropout while training, weight-major linears while generating). Yields len(layers)."""
    for layer in layers:
        layer.forward = functools.partial(forward, layer)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward
