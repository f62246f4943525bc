"""The speed levers: each a module with a switch, a decision and, for some, an `apply`.

- contract.py: what levers and the planner share (switches, facts, `Choice`, the shape of
  a lever, the version contract each lever declares and its `check`); device_memory.py, training_hooks.py, token_tally.py: leaves shared by levers.
- one module per lever (it defines `SWITCH`): flex_attention, micro_batch, liger_kernel,
  compile_model, light_metrics, data_workers, cast_weights_once, bf16_residual_stream,
  fuse_gradient_accumulation, fp8_matmuls, rotary_tables_once, parallel_save.
- their mechanics, the code that patches TRL, transformers and torch (no switch):
  lean_steps and kept_logits (lightMetrics), weight_copies (castWeightsOncePerStep and
  fuseGradientAccumulation), fp8_linear (fp8Matmuls), residual_stream
  (bf16ResidualStream), rotary_tables (rotaryTablesOnce), weights_writer (parallelSave).

Nothing here imports the trainer (settings, failures, train), and no lever imports another
lever: the planner, sftjob_trainer/speed.py, chooses among them and applies them.
"""
