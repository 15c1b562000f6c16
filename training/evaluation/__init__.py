"""The evaluation stage (launch/eval.py): config.py (EvalConfig), run.py (the stage), zeroshot.py
(lm-eval scoring, also used by training's periodic evaluation), perplexity.py, latency.py."""
