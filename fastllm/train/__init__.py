"""Fine-tuning through fastllm's kernels: `fastllm.train.finetune(model, data, tokenizer, ...)` and `fastllm train`."""
from .data import load_blocks
from .finetune import TrainResult, finetune, lr_factor, plot_losses

__all__ = ["finetune", "TrainResult", "load_blocks", "lr_factor", "plot_losses"]
