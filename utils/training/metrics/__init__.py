"""The outputs seam: the run's metric rows and their sinks (CSV/JSON files, W&B, the progress bar), gradient
statistics, plots and the summary table."""
from .gradient_stats import GradientStats
from .logging_settings import LoggingSettings
from .metrics_files import MetricsFiles, set_aside_earlier_outputs
from .plots import OBJECTIVE_LABEL, plot_rows, run_title, save_search_plots, search_figures, training_figures
from .progress import Progress
from .rows import EPOCH_COLUMNS, MetricRows, epoch_line, epoch_row, eval_row, safe_exp, step_row
from .summary_table import MetricsSummary
from .wandb_sink import WandbSink, import_wandb

__all__ = ["EPOCH_COLUMNS", "GradientStats", "LoggingSettings", "MetricRows", "MetricsFiles", "MetricsSummary",
           "OBJECTIVE_LABEL", "Progress", "WandbSink", "epoch_line", "epoch_row", "eval_row", "import_wandb",
           "plot_rows", "run_title", "safe_exp", "save_search_plots", "search_figures", "set_aside_earlier_outputs",
           "step_row", "training_figures"]
