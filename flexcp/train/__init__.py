"""The fine-tuning recipe: YAML config -> (dp, cp) mesh, FSDP2, flexcp context parallelism, checkpoints.

``flexcp finetune --config cfg.yaml [key=value ...]`` (under torchrun) and ``flexcp demo``.
Modules: schema, config, tokenizer, packing, data, model, parallel, loss, metrics, checkpoint, loop, cli, demo.
"""
