"""What the two MatQuant training routes share, one concept per module:

- `objective`   R, λ and co-distillation (`--bits-list`, `--lambdas`, `--distill`): the one parser and its data;
- `workdir`     the work dir: settings fingerprint, atomically written units of finished work, resume;
- `diverged`    the error a NaN/Inf loss raises, with what to try;
- `fake_quant`  fake-quantized linear layers (STE) for end-to-end QAT;
- `lwc`         the learnable clipping (LWC) / equivalent transformation (LET) of one transformer block;
- `block_loop`  the block-wise (OmniQuant-style) calibration loop over activation streams;
- `qat_config`, `distributed`, `qat_loop`   QAT hyper-parameters and schedule, torchrun helpers, the training loop;
- `fsdp`, `activation_checkpointing`   FSDP2 sharding of the model (`--shard fsdp`) and its undoing, activation
  checkpointing of the decoder blocks (`--activation-checkpointing`).

Block-input capture is `matquant.algorithms.blocks` (shared with GPTQ / MatGPTQ). The methods themselves are the
thin entry points `matquant.algorithms.omniquant` and `matquant.algorithms.qat`.
"""
