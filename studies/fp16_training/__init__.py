"""Which training configurations break float16 inference? (issue 14; the report is ``docs/fp16-study.md``.)

Small transformers are trained from scratch on text that ships with Python and hyprec, varying one factor at a
time against a baseline; every checkpoint is then measured by hyprec itself: ``hyprec check`` (weights-only bound
and a calibrated float32 pass) and ``hyprec compare`` (whole-model and hybrid half precision against float32).

The models are Hugging Face architectures that hyprec loads (Llama, Qwen3, Gemma-3, BERT), trained with
transformers' own classes, so every checkpoint goes through the product's real loading, check and compare paths.

Run ``python -m studies.fp16_training`` (the default grid) or ``--quick`` (a smoke run of under a minute).
"""
