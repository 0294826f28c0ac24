"""Fine-tuning sketched models: only the codebooks train (codes stay frozen), through Hugging Face Trainer."""

#: Healing's default learning rate (``sketchtune heal`` and ``sketch --heal-steps``), 10× task fine-tuning's.
#: Measured on SmolLM2-135M (benchmarks/results/sketch_quality.json, 50 steps each): 1e-3 beat 1e-4 on every
#: configuration probed, on WikiText-2 and on held-out C4 — INT4 GPR 1 30.81 vs 31.40, INT3 GPR 4 36.03 vs
#: 38.14, INT2 GPR 4 88.0 (vs 98.1 after 150 steps at 1e-4). Codebook entries are whole weights, not small
#: adapter deltas, and the KL objective's gradients are small: at 1e-4 the linear decay ends the run first.
HEAL_LEARNING_RATE = 1e-3
