"""The tuner: wraps a model's layers and applies adapters' updates; knows nothing of data or training.

Modules, in import order (each imports only those above it):

- :mod:`.dtypes` (fp32 masters), :mod:`.fused` (the fused linear kernels), :mod:`.structures` (what a row,
  column, sparse or tap-column update is, and the registry of structures), :mod:`.batch_context` (the
  per-thread mixed batch, a leaf), :mod:`.state` (the one state of a wrapped model);
- :mod:`.layer` (the wrappers), :mod:`.owned` (tensors adapters train in full);
- :mod:`.anatomy` (reading a model), :mod:`.targets` (which layers are targeted), :mod:`.trainable` (what
  trains);
- :mod:`.lifecycle` (switch, delete, merge, disable), :mod:`.mixed` (mixed-adapter batches), :mod:`.model`
  (inject, merge and unload), :mod:`.regularization` (the L2-to-pretrained penalty).

Each name loads its module on first use.
"""
from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "anatomy": ["base_tensors", "head_module_names", "is_grft_model", "model_groups", "original_name"],
    "layer": ["GRFTConv2d", "GRFTLayer", "GRFTLinear", "grft_layers"],
    "lifecycle": ["delete_adapter", "disable_adapter", "list_adapters", "merge_adapter", "set_adapter",
                  "unmerge_adapter"],
    "mixed": ["mixed_adapters"],
    "model": ["inject", "merge_grft", "unload_grft"],
    "owned": ["owned_tensors"],
    "regularization": ["L2ToPretrained"],
    "state": ["DEFAULT_ADAPTER", "AdapterRecord", "GRFTState", "grft_state"],
    "structures": ["STRUCTURES", "Update", "register_structure"],
    "targets": ["check_targets", "find_target_layers"],
    "trainable": ["TrainableReport", "adapter_parameters", "print_trainable_parameters", "set_trainable",
                  "trainable_parameters_report"],
})
