"""Fine-tuning sketched models: only the codebooks train (codes stay frozen), through Hugging Face Trainer."""

#: Healing's default learning rate (``sketchtune heal`` and ``sketch --heal-steps``), 10× task fine-tuning's.
#: Measured on SmolLM2-135M (benchmarks/results/sketch_quality.json, 50 steps each): 1e-3 beat 1e-4 on every
#: configuration probed, on WikiText-2 and on held-out C4 — INT4 GPR 1 30.81 vs 31.40, INT3 GPR 4 36.03 vs
#: 38.14, INT2 GPR 4 88.0 (vs 98.1 after 150 steps at 1e-4, its curve still falling when the linear decay
#: reached zero). A longer run at 1e-3 did no better (INT4 GPR 1, 100 steps: 31.02 vs 30.81 after 50).
HEAL_LEARNING_RATE = 1e-3
