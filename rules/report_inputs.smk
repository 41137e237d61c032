# Input functions of the report (rules/report.smk, which includes this file); get_final_outputs calls the first
# ones too. Nothing here looks at what is on disk: each list follows from the config (and halving's selections).


def result_files(wildcards=None):
    """What the report reads: every grid result, or (halving) the results of the runs that reached the budget."""
    if HALVING:
        return [
            HALVING_RESULT.format(model=m, variant=v)
            for m in MODELS
            for v in finalists(m)
        ]
    pairs = RUNS[["model", "variant"]].drop_duplicates()
    return [f"results/{m}/{v}.json" for m, v in pairs.itertuples(index=False)]


def history_files(wildcards=None):
    if HALVING:  # the last rung's history holds every epoch since the first rung
        return [
            rung_file(m, v, s, len(SCHEDULE), "history.csv")
            for m in MODELS
            for v in finalists(m)
            for s in SEEDS
        ]
    return [
        f"runs/{r.model}/{r.variant}/seed{r.seed}/history.csv"
        for r in RUNS.itertuples()
    ]


def search_summary_files(wildcards=None):
    """Halving's summaries, or (optuna) each model's model-based search, which the report sets against the grid."""
    if HALVING:
        return [f"search/{m}/halving.json" for m in MODELS]
    return optuna_summary_files()


def report_grid_results(wildcards=None):
    """report.halving_vs_grid (halving only): every candidate's grid result, measured against the halving."""
    if not (HALVING and config["report"]["halving_vs_grid"]):
        return []
    return [f"results/{m}/{v}.json" for m in MODELS for v in VARIANTS]
