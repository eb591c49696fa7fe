"""The transfer benchmark (``python benchmarks/transfer.py``), one concept per module.

=====================  ===================================================================================
``settings``           :class:`Settings` (what sizes the benchmark), the presets ``FULL`` / ``QUICK``, the
                       tuned learning rates and L2 lambda
``data``               the offline images: the procedural source task and the few-shot targets (NumPy)
``model``              the small timm ViT and its input convention
``pretrain``           pre-training on the source task (data-parallel, cached), the weights' hash
``methods``            the method registry ``METHODS``, what a method gets and returns, every method, suites
``jobs``               one fine-tuning job, and many in worker processes
``orchestration``      a whole run (``run_benchmark``), the learning-rate / lambda choice (``tune``), a study's
                       jobs (``run_study``) and the first-order diagnostic run (``run_first_order``)
``report``             summaries over seeds, paired differences, the selection record, the markdown table
``plots``              accuracy vs trainable %, the width sweep's and the budget study's figures
``sweep``              the width sweep: settings per (width, pre-training seed), running and loading it
``sweep_statistics``   what the sweep compares and its statistics (paired differences, t intervals, tables)
``first_order``        the first-order share of a row / column choice (task-loss gradient vs its oracle)
``budget``             the budget study: GRFT vs random vs lowest rows as the training budget grows
``provenance``         the machine, the code version and the command line a run records
``log``                the run's log lines
``cli``                the command line
=====================  ===================================================================================

Worker processes (``multiprocessing`` spawn) import these modules by name: ``benchmarks/`` must be on
``sys.path``, as it is when a script in ``benchmarks/`` runs.
"""
