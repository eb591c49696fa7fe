"""The language-model path: GRFT on GLUE (CoLA, MRPC, RTE) with a Hugging Face model (Llama-3.2-1B).

Built on the same pieces as the vision side — :func:`grft_vision.apply_grft`, the SupCon selection on the
lowest-loss subset, :class:`grft_vision.L2ToPretrained`, adapters, and the training engine — with what
differs for text:

- :mod:`.data`: GLUE's TSV files, JSON lines or Hugging Face ``datasets``; tokenisation; padding collate;
- :mod:`.modeling`: tokenizer with a pad token, ``AutoModelForSequenceClassification``, bf16, checkpointing;
- :mod:`.features`: the pooled final hidden state as selection features;
- :mod:`.metrics`: accuracy, Matthews correlation (CoLA), F1 (MRPC);
- :mod:`.task`: :class:`GlueTask`, the engine's task; :mod:`.config`: :class:`GlueTrainConfig`;
- :mod:`.cli`: ``train_glue.py`` / ``grft-train-glue``.

Library use::

    from grft_vision import GRFTConfig, apply_grft
    from grft_vision.llm import TokenFeatures, load_glue, load_tokenizer, load_classifier, tokenize_dataset

    model = apply_grft(model, config=GRFTConfig(structure="row", k=3, selection_views=1,
                                                 target_modules=["*layers.*"]),
                       dataloader=loader, features=TokenFeatures("last"))

Needs ``pip install 'grft-vision[llm]'`` (transformers, scikit-learn, datasets); each name loads its module on
first use, and a missing package is an error naming that extra.
"""
from .._lazy import attach

__getattr__, __dir__, __all__ = attach(__name__, {
    "batches": ["TokenBatches"],
    "config": ["DTYPES", "POOLINGS", "GlueTrainConfig"],
    "data": ["GLUE_LAYOUTS", "GLUE_TASK_NAMES", "GLUE_TASKS", "GlueDataset", "GlueExample", "GlueTaskInfo",
             "PadCollate", "SequenceTooLongError", "load_glue", "read_glue_jsonl", "read_glue_tsv", "tokenize_dataset"],
    "features": ["TokenFeatures", "final_hidden_state", "last_token_index", "pool_hidden_states"],
    "metrics": ["glue_metrics"],
    "modeling": ["check_max_length", "enable_gradient_checkpointing", "keep_head_float32", "load_classifier",
                 "load_tokenizer", "resolve_dtype", "resolve_pooling"],
    "task": ["GlueTask"],
})
