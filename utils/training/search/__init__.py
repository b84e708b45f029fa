"""The hyperparameter search: Optuna trials over fine_tune, the search space, the study's storage and set-up."""
from .run import N_TRIALS_DEFAULT, SearchRequest, run_search
from .search_space import DEFAULT_SEARCH_SPACE

__all__ = ["DEFAULT_SEARCH_SPACE", "N_TRIALS_DEFAULT", "SearchRequest", "run_search"]
