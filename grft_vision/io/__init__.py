"""State in and out of a GRFT model: adapter files and directories (:mod:`.adapters`, their format
:mod:`.adapter_format`, the base model's identity :mod:`.identity`), checkpoints of runs and trainers
(:mod:`.checkpoints`), and plain merged weights (:mod:`.export`).

Each name loads its module on first use.
"""
from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "adapter_format": ["ADAPTER_FORMAT", "adapter_state", "adapter_tensors"],
    "adapters": ["apply_adapter_state", "from_pretrained", "load_adapter", "save_adapter", "save_pretrained"],
    "checkpoints": ["SavedModel", "read_saved", "rebuild_wrapped"],
    "export": ["export_merged", "write_merged"],
    "identity": ["fingerprint"],
})
