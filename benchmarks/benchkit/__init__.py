"""What the benchmark scripts share, imported the normal way (a script's folder is on ``sys.path``).

==============  ==========================================================================================
``registry``    :class:`MethodRegistry`: the one method registry of ``step_cost.py``, ``llm_step_cost.py``
                and ``transfer_bench`` (a name -> the function that prepares the method, with its metadata)
``step``        a step-cost method's record, :class:`Setup` (one method ready to train) and one training
                step: plain, instrumented, profiled
``flops``       the FLOP counter (with PyTorch's SDPA formulas for the CPU flash-attention kernels)
``memory``      bytes: saved for backward, optimizer state, resident tensors, trainable tensors, files
``compare``     methods side by side: interleaved timing, ratios to reference methods, the thread count
``report``      what a step-cost run prints and writes: progress lines, markdown tables, target checks,
                the JSON / markdown files, the exit status
``cli``         the flags every step-cost script takes
``trainable``   what trains: parameters that require grad, Adam over them, a timm ViT's LoRA targets
``peers``       PEFT's sparse peers of ``grft-sparse`` (SHiRA, Super-Tuning) at its trainable count, and the
                checks comparing them
==============  ==========================================================================================
"""
