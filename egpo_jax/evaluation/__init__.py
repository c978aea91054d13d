"""Evaluation: accuracy (pass@k, maj@k) and calibration of a policy's confidence.

  passk        pass@k (Chen et al. 2021's unbiased estimator), maj@k, answer keys for voting
  calibration  ECE (equal-mass bins), Brier, AUROC, entropy of correct vs wrong responses,
               overconfident failures; `evaluate_generation` for the trainer's validation
  benchmarks   the paper's benchmarks and the synthetic task as uniform records
  runner       sample -> verify -> summarise per benchmark (`evaluate`)
  loading      a training workdir or a Hugging Face folder -> params, config, tokenizer;
               a training config's model section -> model config, tokenizer
  plots        reliability diagrams, entropy histograms, overlays of several runs
  report       Markdown tables
  stats        over seeds: t-intervals, paired t and sign-flip tests, Holm, power and n

The trainer's evaluation during a run is `training.validation`. Evaluation imports no
training module but the checkpoint reader `training.checkpointing`. The command lines
are `experiments/evaluate.py` and `experiments/compare.py`.
"""
