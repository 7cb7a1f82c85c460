"""`kdforge bench distill`: distillation recipes side by side on shipped tasks and teachers.

    lang.py     the broad task's language: a stochastic grammar of short sentences
    tasks.py    the tasks (sort, lang, langx), their teachers, in-process teacher answers, scoring
    recipes.py  the recipes as kdforge training configs (ce, top-k fKL T 1/2, dense, on-policy rKL/JSD)
    run.py      the cells (task x recipe x budget x seed) through run_training, spend counted two ways
    report.py   table (mean, min-max), gap closed at equal answers and equal $, goals, PNG plots
    assets/lang the broad task's teacher (scripts/train_bench_teacher.py)

Heavy imports happen inside functions: `kdforge --help` stays fast.
"""
