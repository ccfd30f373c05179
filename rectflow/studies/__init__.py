"""The paper's studies at small scale, one module each, run by `rectflow ablate STUDY` (rectflow.ablate).

A study module defines TITLE, `runs(opts) -> list[Run]` (its grid), `execute(run, run_dir, opts) -> dict` (train
and evaluate one run, resumably) and `report(results, opts, fig_dir) -> str` (the markdown body of its report).
"""

STUDIES = {
    "formulations": "rectflow.studies.formulations",   # docs/paper.md §3, Table 1
    "architectures": "rectflow.studies.architectures",  # docs/paper.md §4, architecture study
    "channels": "rectflow.studies.channels",            # docs/paper.md §4, autoencoder channels
    "shift": "rectflow.studies.shift",                  # docs/paper.md §5, resolution-dependent shift
    "steps": "rectflow.studies.steps",                  # docs/paper.md §6, Table 6
    "speedups": "rectflow.studies.speedups",            # docs/training.md "Learning speed"
}
